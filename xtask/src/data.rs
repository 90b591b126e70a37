//! Deterministic test data, generated fast (a xorshift stream, not /dev/urandom).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Fills `buf` with incompressible bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `len` incompressible bytes to a new file.
pub fn random_file(path: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    let mut rng = Rng::new(seed);
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()
}

/// Rewrites `fraction` of the file's aligned 4 KiB blocks at random offsets, in place.
pub fn rewrite_blocks(path: &Path, fraction: f64, seed: u64) -> std::io::Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = f.metadata()?.len() / 4096;
    let n = (blocks as f64 * fraction) as u64;
    let mut rng = Rng::new(seed);
    let mut buf = [0u8; 4096];
    for _ in 0..n {
        rng.fill(&mut buf);
        f.write_all_at(&buf, rng.below(blocks) * 4096)?;
    }
    Ok(n)
}

/// Appends `len` incompressible bytes.
pub fn append(path: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// A sparse file of `len` bytes with `allocated` bytes of data in 1 MiB extents spread over it.
pub fn sparse_file(path: &Path, len: u64, allocated: u64, seed: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(len)?;
    let extents = allocated / (1 << 20);
    let stride = len / extents.max(1);
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..extents {
        rng.fill(&mut buf);
        f.write_all_at(&buf, i * stride)?;
    }
    Ok(())
}

/// `files` files of 1..=64 KiB spread over `dirs` directories.
pub fn small_files(root: &Path, dirs: usize, files: usize, seed: u64) -> std::io::Result<u64> {
    let mut rng = Rng::new(seed);
    let mut total = 0;
    let mut buf = vec![0u8; 64 << 10];
    for d in 0..dirs {
        std::fs::create_dir_all(root.join(format!("d{d:03}")))?;
    }
    for i in 0..files {
        let len = 1024 + rng.below(63 << 10) as usize;
        rng.fill(&mut buf[..len]);
        std::fs::write(root.join(format!("d{:03}/f{i:05}", i % dirs)), &buf[..len])?;
        total += len as u64;
    }
    Ok(total)
}

/// `dirs` directories with `per_dir` small files each (for the no-change re-sync).
pub fn wide_tree(root: &Path, dirs: usize, per_dir: usize) -> std::io::Result<()> {
    for d in 0..dirs {
        let dir = root.join(format!("dir{d:04}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..per_dir {
            std::fs::write(dir.join(format!("f{f:03}")), format!("{d}/{f}\n"))?;
        }
    }
    Ok(())
}

/// Moves a file's mtime `secs` into the future, as a later writer would:
/// benchmark steps happen within one second, which rsync's quick check
/// (size + mtime in seconds) would otherwise take for "unchanged".
pub fn bump_mtime(path: &Path, secs: i64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path)?;
    let t = nix::sys::time::TimeSpec::new(md.mtime() + secs, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )?;
    Ok(())
}

/// An image of typical guest content, in 64 KiB runs: zeros (free space),
/// text (logs, configuration), binary with structure (code, tables) and
/// random (compressed or encrypted data).
pub fn guest_image(path: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    use std::io::Write;
    const WORDS: [&str; 16] = [
        "kernel",
        "error",
        "connection",
        "user",
        "session",
        "2026-11-22",
        "INFO",
        "disk",
        "warning",
        "/var/log",
        "started",
        "service",
        "=",
        "0x7f3a",
        "ok",
        "\n",
    ];
    let mut rng = Rng::new(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 64 << 10];
    let mut done = 0;
    while done < len {
        let n = chunk.len().min((len - done) as usize);
        let c = &mut chunk[..n];
        match rng.below(100) {
            0..=34 => c.fill(0),
            35..=64 => {
                let mut i = 0;
                while i < n {
                    let w = WORDS[rng.below(16) as usize].as_bytes();
                    let k = w.len().min(n - i);
                    c[i..i + k].copy_from_slice(&w[..k]);
                    i += k;
                    if i < n {
                        c[i] = b' ';
                        i += 1;
                    }
                }
            }
            65..=84 => {
                let mut pattern = [0u8; 256];
                rng.fill(&mut pattern);
                for (i, b) in c.iter_mut().enumerate() {
                    *b = pattern[i % 256] ^ if i % 97 == 0 { rng.next() as u8 } else { 0 };
                }
            }
            _ => rng.fill(c),
        }
        f.write_all(c)?;
        done += n as u64;
    }
    f.flush()
}

/// Text files of 1..=64 KiB (lines of words) over `dirs` directories.
pub fn text_files(root: &Path, dirs: usize, files: usize, seed: u64) -> std::io::Result<u64> {
    let mut rng = Rng::new(seed);
    let mut total = 0;
    for d in 0..dirs {
        std::fs::create_dir_all(root.join(format!("d{d:03}")))?;
    }
    for i in 0..files {
        let len = 1024 + rng.below(63 << 10) as usize;
        let mut s = String::with_capacity(len + 80);
        while s.len() < len {
            s.push_str(&format!(
                "line {} of file {i}: value {:x}\n",
                s.len(),
                rng.next()
            ));
        }
        s.truncate(len);
        std::fs::write(root.join(format!("d{:03}/f{i:05}", i % dirs)), s.as_bytes())?;
        total += len as u64;
    }
    Ok(total)
}
