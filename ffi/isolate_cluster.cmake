# Links a CMake target against isolate-cluster's C library in one step:
#
#   set(ISOLATE_CLUSTER_DIR /path/to/isolate-cluster)   # the repository root
#   include(${ISOLATE_CLUSTER_DIR}/ffi/isolate_cluster.cmake)
#   target_link_libraries(my_app PRIVATE isolate_cluster::isolate_cluster)
#
# Build the library first: `cargo build --release -p isolate-cluster-ffi` (it lands in
# target/release/). Set ISOLATE_CLUSTER_SHARED to ON to link libisolate_cluster.so instead
# of the static archive.
if(NOT DEFINED ISOLATE_CLUSTER_DIR)
  get_filename_component(ISOLATE_CLUSTER_DIR "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
endif()
option(ISOLATE_CLUSTER_SHARED "Link libisolate_cluster.so instead of the .a" OFF)
set(_ic_lib_dir "${ISOLATE_CLUSTER_DIR}/target/release")
find_package(Threads REQUIRED)
if(ISOLATE_CLUSTER_SHARED)
  add_library(isolate_cluster::isolate_cluster SHARED IMPORTED)
  set(_ic_lib "${_ic_lib_dir}/libisolate_cluster.so")
else()
  add_library(isolate_cluster::isolate_cluster STATIC IMPORTED)
  set(_ic_lib "${_ic_lib_dir}/libisolate_cluster.a")
endif()
set_target_properties(isolate_cluster::isolate_cluster PROPERTIES
  IMPORTED_LOCATION "${_ic_lib}"
  INTERFACE_INCLUDE_DIRECTORIES "${ISOLATE_CLUSTER_DIR}/ffi/include"
  INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m")
