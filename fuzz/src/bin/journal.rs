//! AFL++ target: see `georep_fuzz::journal`.
fn main() {
    afl::fuzz!(|data: &[u8]| georep_fuzz::journal(data));
}
