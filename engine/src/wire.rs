//! What travels between nodes, independent of the transport: the types that may cross
//! (wire tags, validation, rebuilding transferred values) and the envelopes that carry
//! messages and announcements. The network layer (`net`, feature `zenoh`) sends and
//! receives these; keeping them here lets the fuzz targets and tests exercise the
//! parsing of bytes from the network without a network.
#![cfg_attr(not(feature = "zenoh"), allow(dead_code))]

use std::any::type_name;
use std::collections::HashMap;
use std::sync::Arc;

use rkyv::api::high::HighValidator;
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::Strategy;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Portable, Serialize};

use crate::frame::{
    drop_box, TransferPayload, TypeTag, FLAG_CALL, FLAG_ERROR, FLAG_RAW, FLAG_REPLY, RUST_TAG_BIT,
};
use crate::isolate::{DownReason, IsolateRef};
use crate::path::{validate_path, PropertyValue};
use crate::Payload;

// ---------------------------------------------------------------------------------------
// Types on the wire.

pub(crate) type CheckFn = fn(&[u8]) -> bool;
/// Serialises the value behind a transfer pointer (not consuming it).
pub(crate) type ToWireFn = unsafe fn(*mut u8) -> Option<Vec<u8>>;
/// Validates and rebuilds a transferred value from 16-aligned bytes.
pub(crate) type FromWireFn = fn(&[u8]) -> Option<TransferPayload>;

pub(crate) struct WireType {
    pub(crate) wire: u64,
    pub(crate) local: TypeTag,
    pub(crate) check: CheckFn,
    pub(crate) to_wire: ToWireFn,
    pub(crate) from_wire: Option<FromWireFn>,
}

#[derive(Clone, Default)]
pub(crate) struct WireTypes {
    pub(crate) by_local: HashMap<TypeTag, Arc<WireType>>,
    pub(crate) by_wire: HashMap<u64, Arc<WireType>>,
}

/// The wire tag of a type: FNV-1a of its type path, top bit set.
pub(crate) fn wire_tag<T: ?Sized>() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in type_name::<T>().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | RUST_TAG_BIT
}

pub(crate) fn check_bytes<T>(bytes: &[u8]) -> bool
where
    T: Archive,
    T::Archived: Portable + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>,
{
    rkyv::access::<T::Archived, rkyv::rancor::Error>(bytes).is_ok()
}

/// # Safety
/// `ptr` comes from `Box::<T>::into_raw` and the value is alive.
pub(crate) unsafe fn to_wire<T: Payload>(ptr: *mut u8) -> Option<Vec<u8>> {
    // SAFETY: per the contract, `ptr` points to a live `T`.
    let value = unsafe { &*ptr.cast::<T>() };
    crate::frame::encode(value).ok()
}

pub(crate) fn from_wire<T>(bytes: &[u8]) -> Option<TransferPayload>
where
    T: Archive + Send + 'static,
    T::Archived: Portable
        + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>
        + Deserialize<T, Strategy<Pool, rkyv::rancor::Error>>,
{
    let value = rkyv::from_bytes::<T, rkyv::rancor::Error>(bytes).ok()?;
    Some(TransferPayload {
        ptr: Box::into_raw(Box::new(value)).cast::<u8>(),
        drop_fn: drop_box::<T>,
    })
}

impl WireTypes {
    pub(crate) fn add<T>(&mut self, from_wire: Option<FromWireFn>)
    where
        T: Payload + Archive,
        T::Archived: Portable + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>,
    {
        let t = Arc::new(WireType {
            wire: wire_tag::<T>(),
            local: crate::frame::type_tag::<T>(),
            check: check_bytes::<T>,
            to_wire: to_wire::<T>,
            from_wire,
        });
        self.by_local.insert(t.local, t.clone());
        self.by_wire.insert(t.wire, t);
    }

    pub(crate) fn builtin() -> Self {
        let mut t = Self::default();
        macro_rules! full {
            ($($ty:ty),*) => { $( t.add::<$ty>(Some(from_wire::<$ty>)); )* };
        }
        full!(
            (),
            bool,
            char,
            u8,
            u16,
            u32,
            u64,
            u128,
            i8,
            i16,
            i32,
            i64,
            i128,
            f32,
            f64,
            String,
            Vec<u8>,
            Vec<u32>,
            Vec<u64>,
            Vec<i64>,
            Vec<f32>,
            Vec<f64>,
            Vec<String>
        );
        for (check, local, wire) in crate::task::wire_types() {
            let w = Arc::new(WireType {
                wire,
                local,
                check,
                to_wire: no_transfer,
                from_wire: None,
            });
            t.by_local.insert(local, w.clone());
            t.by_wire.insert(wire, w);
        }
        t
    }
}

/// For types that travel by copy only.
unsafe fn no_transfer(_: *mut u8) -> Option<Vec<u8>> {
    None
}

/// A copy-only wire type: its check, local tag and wire tag.
pub(crate) type WireEntry = (CheckFn, TypeTag, u64);

/// The [`WireEntry`] of `T`.
pub(crate) fn wire_entry<T>() -> WireEntry
where
    T: Archive + 'static,
    T::Archived: Portable + for<'b> CheckBytes<HighValidator<'b, rkyv::rancor::Error>>,
{
    (
        check_bytes::<T>,
        crate::frame::type_tag::<T>(),
        wire_tag::<T>(),
    )
}

// ---------------------------------------------------------------------------------------
// Envelopes.

pub(crate) const VERSION: u8 = 1;
pub(crate) const KIND_MSG: u8 = 1;
pub(crate) const KIND_CTL: u8 = 2;
/// Bytes before a message's payload.
pub(crate) const MSG_HEADER: usize = 32;
/// Bytes before a control message's archive.
pub(crate) const CTL_HEADER: usize = 8;
pub(crate) const KNOWN_FLAGS: u8 = FLAG_CALL | FLAG_REPLY | FLAG_ERROR | FLAG_RAW;

/// A message envelope's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MsgHeader {
    pub(crate) flags: u8,
    pub(crate) transfer: bool,
    pub(crate) target: u32,
    pub(crate) sender: u32,
    pub(crate) reply_to: u32,
    pub(crate) tag: u64,
    pub(crate) correlation: u64,
}

impl MsgHeader {
    pub(crate) fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(MSG_HEADER + payload.len());
        b.extend_from_slice(&[VERSION, KIND_MSG, self.flags, u8::from(self.transfer)]);
        b.extend_from_slice(&self.target.to_le_bytes());
        b.extend_from_slice(&self.sender.to_le_bytes());
        b.extend_from_slice(&self.reply_to.to_le_bytes());
        b.extend_from_slice(&self.tag.to_le_bytes());
        b.extend_from_slice(&self.correlation.to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<(Self, &[u8]), &'static str> {
        if b.len() < MSG_HEADER {
            return Err("message shorter than its header");
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let h = Self {
            flags: b[2],
            transfer: match b[3] {
                0 => false,
                1 => true,
                _ => return Err("bad frame kind"),
            },
            target: u32_at(4),
            sender: u32_at(8),
            reply_to: u32_at(12),
            tag: u64_at(16),
            correlation: u64_at(24),
        };
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err("unknown flags");
        }
        if h.target == 0 || h.sender == 0 {
            return Err("no target or no sender");
        }
        let raw = h.flags & FLAG_RAW != 0;
        if raw && (h.transfer || h.tag & RUST_TAG_BIT != 0) {
            return Err("raw bytes must be a copy with an application tag");
        }
        if !raw && h.tag & RUST_TAG_BIT == 0 {
            return Err("typed payload without a wire type tag");
        }
        Ok((h, &b[MSG_HEADER..]))
    }
}

/// Announcements, in the same stream as messages.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub(crate) enum Ctl {
    /// The sender's live isolates (the first envelope to a node).
    Hello(Vec<Desc>),
    /// An isolate started.
    Up(Desc),
    /// An isolate stopped.
    Down { id: u32, reason: WireReason },
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub(crate) struct Desc {
    pub(crate) id: u32,
    pub(crate) path: String,
    pub(crate) props: Vec<(String, WireProp)>,
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub(crate) enum WireProp {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
pub(crate) enum WireReason {
    Normal,
    Exited,
    Panicked(String),
    Escalated(String),
    NodeLost(String),
}

impl From<&DownReason> for WireReason {
    fn from(r: &DownReason) -> Self {
        match r {
            DownReason::Normal => Self::Normal,
            DownReason::Exited => Self::Exited,
            DownReason::Panicked(m) => Self::Panicked(m.clone()),
            DownReason::Escalated(m) => Self::Escalated(m.clone()),
            DownReason::NodeLost(n) => Self::NodeLost(n.clone()),
        }
    }
}

impl From<WireReason> for DownReason {
    fn from(r: WireReason) -> Self {
        match r {
            WireReason::Normal => Self::Normal,
            WireReason::Exited => Self::Exited,
            WireReason::Panicked(m) => Self::Panicked(m),
            WireReason::Escalated(m) => Self::Escalated(m),
            WireReason::NodeLost(n) => Self::NodeLost(n),
        }
    }
}

pub(crate) fn desc_of(r: &IsolateRef) -> Desc {
    Desc {
        id: r.id(),
        path: r.path().to_owned(),
        props: r
            .properties()
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    PropertyValue::Str(s) => WireProp::Str(s.clone()),
                    PropertyValue::Int(i) => WireProp::Int(*i),
                    PropertyValue::Float(x) => WireProp::Float(*x),
                    PropertyValue::Bool(b) => WireProp::Bool(*b),
                };
                (k.to_owned(), v)
            })
            .collect(),
    }
}

pub(crate) fn encode_ctl(ctl: &Ctl) -> Vec<u8> {
    let archive = match rkyv::to_bytes::<rkyv::rancor::Error>(ctl) {
        Ok(a) => a,
        Err(e) => unreachable!("announcements always serialise: {e}"),
    };
    let mut b = Vec::with_capacity(CTL_HEADER + archive.len());
    b.extend_from_slice(&[VERSION, KIND_CTL, 0, 0, 0, 0, 0, 0]);
    b.extend_from_slice(&archive);
    b
}

pub(crate) fn decode_ctl(b: &[u8]) -> Result<Ctl, &'static str> {
    if b.len() < CTL_HEADER || b[2..CTL_HEADER].iter().any(|&x| x != 0) {
        return Err("bad announcement header");
    }
    let mut aligned = AlignedVec::<16>::with_capacity(b.len() - CTL_HEADER);
    aligned.extend_from_slice(&b[CTL_HEADER..]);
    let ctl = rkyv::from_bytes::<Ctl, rkyv::rancor::Error>(&aligned)
        .map_err(|_| "invalid announcement archive")?;
    let valid = |d: &Desc| d.id != 0 && validate_path(&d.path).is_ok();
    let ok = match &ctl {
        Ctl::Hello(ds) => ds.iter().all(valid),
        Ctl::Up(d) => valid(d),
        Ctl::Down { id, .. } => *id != 0,
    };
    if ok {
        Ok(ctl)
    } else {
        Err("announcement names an invalid isolate")
    }
}

/// Parses `bytes` as an envelope from the network the way a node does before anything
/// reads them, and reports whether it would pass the checks that need no node state
/// (for fuzzing).
pub(crate) fn check_envelope(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.len() < 2 || bytes[0] != VERSION {
        return Err("unknown envelope version");
    }
    match bytes[1] {
        KIND_MSG => {
            let (h, payload) = MsgHeader::decode(bytes)?;
            if h.flags & FLAG_RAW == 0 {
                let types = WireTypes::builtin();
                let t = types.by_wire.get(&h.tag).ok_or("unregistered type")?;
                let mut aligned = AlignedVec::<16>::with_capacity(payload.len());
                aligned.extend_from_slice(payload);
                if !(t.check)(&aligned) {
                    return Err("invalid payload");
                }
                if h.transfer {
                    let from = t.from_wire.ok_or("type cannot be transferred")?;
                    let p = from(&aligned).ok_or("invalid payload")?;
                    // SAFETY: `from_wire` boxed a fresh value; nobody else has it.
                    unsafe { (p.drop_fn)(p.ptr) };
                }
            }
            Ok(())
        }
        KIND_CTL => decode_ctl(bytes).map(|_| ()),
        _ => Err("unknown envelope kind"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let h = MsgHeader {
            flags: FLAG_CALL,
            transfer: false,
            target: 7,
            sender: 9,
            reply_to: 9,
            tag: wire_tag::<u64>(),
            correlation: 1 << 40,
        };
        let payload = crate::frame::encode(&5u64).unwrap();
        let b = h.encode(&payload);
        let (back, p) = MsgHeader::decode(&b).unwrap();
        assert_eq!((back, p), (h, &payload[..]));
        assert_eq!(check_envelope(&b), Ok(()));
        let ctl = Ctl::Up(Desc {
            id: 3,
            path: "/a/b".into(),
            props: vec![("k".into(), WireProp::Int(-1))],
        });
        assert_eq!(decode_ctl(&encode_ctl(&ctl)), Ok(ctl));
        let bad = Ctl::Up(Desc {
            id: 3,
            path: "relative".into(),
            props: vec![],
        });
        assert!(decode_ctl(&encode_ctl(&bad)).is_err());
    }

    /// Every prefix and every single-byte corruption of valid envelopes, and random
    /// bytes, are judged without a panic.
    #[test]
    fn mangled_envelopes_never_panic() {
        let payload = crate::frame::encode(&"hello".to_string()).unwrap();
        let msg = MsgHeader {
            flags: 0,
            transfer: false,
            target: 1,
            sender: 2,
            reply_to: 2,
            tag: wire_tag::<String>(),
            correlation: 0,
        }
        .encode(&payload);
        let transfer = MsgHeader {
            flags: 0,
            transfer: true,
            target: 1,
            sender: 2,
            reply_to: 0,
            tag: wire_tag::<Vec<u64>>(),
            correlation: 0,
        }
        .encode(&crate::frame::encode(&vec![1u64, 2, 3]).unwrap());
        let ctl = encode_ctl(&Ctl::Hello(vec![Desc {
            id: 1,
            path: "/x".into(),
            props: vec![("s".into(), WireProp::Str("v".into()))],
        }]));
        for valid in [&msg, &transfer, &ctl] {
            assert_eq!(check_envelope(valid), Ok(()));
            for n in 0..valid.len() {
                let _ = check_envelope(&valid[..n]);
            }
            for i in 0..valid.len() {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut m = valid.clone();
                    m[i] ^= x;
                    let _ = check_envelope(&m);
                }
            }
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 96) as usize;
            let mut b: Vec<u8> = (0..len).map(|k| (seed >> (k % 8 * 8)) as u8).collect();
            if b.len() > 1 {
                b[0] = VERSION;
                b[1] = 1 + (seed >> 60) as u8 % 2;
            }
            let _ = check_envelope(&b);
        }
    }

    #[test]
    fn wire_tags_name_types_by_path() {
        assert_ne!(wire_tag::<u64>(), wire_tag::<i64>());
        assert_eq!(wire_tag::<String>() & RUST_TAG_BIT, RUST_TAG_BIT);
        let t = WireTypes::builtin();
        assert!(t.by_wire.contains_key(&wire_tag::<String>()));
        assert_eq!(t.by_local.len(), t.by_wire.len());
    }
}
