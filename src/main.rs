//! The `georep` binary: the command line is [`georep::cli`].

fn main() {
    tune_allocator();
    georep::cli::main()
}

/// Large buffers (4 MiB windows, frames) are mapped and unmapped each
/// time. glibc's default threshold rises to the largest block freed, after
/// which such buffers come from the heap and are kept: a 2 GiB file over 7
/// streams peaked at 90 MiB of worker memory this way, 56 MiB with a fixed
/// threshold, at the same speed.
/// glibc's own `MALLOC_MMAP_THRESHOLD_`, when set, is left in force.
fn tune_allocator() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called first
    // thing in main, before any other thread exists or any allocation
    // depends on the setting.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}
