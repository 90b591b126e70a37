//! AFL++ target: see `georep_fuzz::delta`.
fn main() {
    afl::fuzz!(|data: &[u8]| georep_fuzz::delta(data));
}
