//! AFL++ target: see `georep_fuzz::agent`.
fn main() {
    afl::fuzz!(|data: &[u8]| georep_fuzz::agent(data));
}
