//! The file-system vocabulary both ends share: paths relative to a root
//! that cannot leave it, entry metadata and user xattrs, holes of sparse
//! files, and the xtime/stime stamps georep keeps in xattrs. Uses only
//! `error`; every other layer may use it.

pub mod meta;
pub mod relpath;
pub mod role;
pub mod sparse;
pub mod throttle;
pub mod xtime;
