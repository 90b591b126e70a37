//! The `georep` binary: the command line is [`georep::cli`].

fn main() {
    georep::cli::main()
}
