//! AFL++ target: see `georep_fuzz::frame`.
fn main() {
    afl::fuzz!(|data: &[u8]| georep_fuzz::frame(data));
}
