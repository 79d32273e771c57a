//! Isolate paths and properties.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::PathError;

/// Checks that `path` is a valid isolate path: absolute, non-empty segments, no `.` or
/// `..`, no trailing slash, no control characters.
///
/// ```
/// use isolate_cluster::{validate_path, PathError};
/// assert!(validate_path("/sender/1").is_ok());
/// assert_eq!(validate_path("/a//b"), Err(PathError::EmptySegment));
/// ```
pub fn validate_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter);
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    if rest.is_empty() {
        return Err(PathError::Root);
    }
    if rest.ends_with('/') {
        return Err(PathError::TrailingSlash);
    }
    for seg in rest.split('/') {
        match seg {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a node or cluster name: 1 to 32 ASCII letters, digits, `-` or `_` (names
/// become parts of network keys and socket file names).
///
/// ```
/// use isolate_cluster::{validate_name, PathError};
/// assert!(validate_name("edge-1").is_ok());
/// assert_eq!(validate_name("a/b"), Err(PathError::InvalidName));
/// ```
pub fn validate_name(name: &str) -> Result<(), PathError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PathError::InvalidName)
    }
}

/// One property value.
#[derive(Clone, Debug, PartialEq)]
pub enum PropertyValue {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

impl PropertyValue {
    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The integer, if this is an integer.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::Int(i) => write!(f, "{i}"),
            Self::Float(x) => write!(f, "{x}"),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl PartialEq<str> for PropertyValue {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == Some(other)
    }
}

impl PartialEq<&str> for PropertyValue {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == Some(*other)
    }
}

impl From<&str> for PropertyValue {
    fn from(s: &str) -> Self {
        Self::Str(s.to_owned())
    }
}
impl From<String> for PropertyValue {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}
impl From<i64> for PropertyValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<i32> for PropertyValue {
    fn from(v: i32) -> Self {
        Self::Int(v.into())
    }
}
impl From<f64> for PropertyValue {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}
impl From<bool> for PropertyValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

/// The properties of an isolate: a small string → value map, fixed at spawn and visible
/// on every [`IsolateRef`](crate::IsolateRef) to it.
///
/// ```
/// use isolate_cluster::Properties;
/// let p = Properties::new().with("type", "receiver").with("shard", 3);
/// assert!(p.get("type").is_some_and(|v| v == "receiver"));
/// assert_eq!(p.get("shard").and_then(|v| v.as_int()), Some(3));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties(BTreeMap<String, PropertyValue>);

impl Properties {
    /// No properties.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a property (builder style).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<PropertyValue>) -> Self {
        self.insert(key, value);
        self
    }

    /// Adds or replaces a property.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<PropertyValue>) {
        self.0.insert(key.into(), value.into());
    }

    /// The value of a property.
    pub fn get(&self, key: &str) -> Option<&PropertyValue> {
        self.0.get(key)
    }

    /// All properties, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &PropertyValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of properties.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every property of `pattern` is here with an equal value (an empty pattern
    /// matches everything): the filter of a broadcast to isolates by properties.
    ///
    /// ```
    /// use isolate_cluster::Properties;
    /// let p = Properties::new().with("role", "web").with("shard", 3);
    /// assert!(p.matches(&Properties::new().with("role", "web")));
    /// assert!(!p.matches(&Properties::new().with("role", "web").with("shard", 4)));
    /// assert!(p.matches(&Properties::new()));
    /// ```
    pub fn matches(&self, pattern: &Properties) -> bool {
        pattern.iter().all(|(k, v)| self.get(k) == Some(v))
    }
}

impl<K: Into<String>, V: Into<PropertyValue>, const N: usize> From<[(K, V); N]> for Properties {
    fn from(items: [(K, V); N]) -> Self {
        let mut p = Self::new();
        for (k, v) in items {
            p.insert(k, v);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_paths_get_specific_errors() {
        assert_eq!(validate_path(""), Err(PathError::Empty));
        assert_eq!(validate_path("a"), Err(PathError::NotAbsolute));
        assert_eq!(validate_path("/"), Err(PathError::Root));
        assert_eq!(validate_path("/a//b"), Err(PathError::EmptySegment));
        assert_eq!(validate_path("/a/../b"), Err(PathError::DotSegment));
        assert_eq!(validate_path("/a/./b"), Err(PathError::DotSegment));
        assert_eq!(validate_path("/a/"), Err(PathError::TrailingSlash));
        assert_eq!(validate_path("/a\0b"), Err(PathError::ControlCharacter));
        assert_eq!(validate_path("/sender/1"), Ok(()));
        assert_eq!(validate_path("/a.b/c-d_e"), Ok(()));
    }
}
