//! Nothing is sent that the slave already has: content under a new mtime
//! (touched, copied over with `cp`), a file renamed in its directory, and
//! small edits of small files (sent as deltas). Asserted on the sync's
//! exact byte counters, in full crawls and xtime crawls alike.

mod common;

use common::{n, tree, World};

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            if i % 64 == 63 {
                return b'\n';
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

fn populate(w: &World) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for i in 0..40u64 {
        let dir = w.master.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("f{i}.txt"));
        std::fs::write(&p, content(i, 1000 + (i as usize * 1500))).unwrap();
        files.push(p);
    }
    // One file of several windows too.
    let big = w.master.join("d0/big.img");
    std::fs::write(&big, content(77, 9 << 20)).unwrap();
    files.push(big);
    files
}

fn touch_all(files: &[std::path::PathBuf], secs: u64) {
    for f in files {
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(secs);
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
}

#[test]
fn unchanged_content_under_new_mtimes_sends_no_data() {
    for marks in [false, true] {
        let w = World::new();
        let files = populate(&w);
        w.create("u", &["--marker", if marks { "mark" } else { "auto" }]);
        w.sync("u");
        // Touched: same content, new mtime.
        touch_all(&files, 100);
        // Rewritten with the same content through a new inode, as `cp` over it would.
        for f in files.iter().step_by(3) {
            let data = std::fs::read(f).unwrap();
            std::fs::remove_file(f).unwrap();
            std::fs::write(f, data).unwrap();
        }
        if marks {
            for f in &files {
                common::mark(f);
            }
        }
        let s = w.sync("u");
        assert_eq!(s["crawl"], if marks { "xtime" } else { "full" }, "{s}");
        assert_eq!(n(&s, "bytes_sent"), 0, "no data for unchanged content: {s}");
        assert_eq!(n(&s, "files_synced"), 0, "{s}");
        assert_eq!(n(&s, "files_unchanged"), files.len() as u64, "{s}");
        // The probes and their answers are all that crossed: about 200 bytes a file.
        assert!(
            n(&s, "wire_bytes_out") < 300 * files.len() as u64 + 20_000,
            "{s}"
        );
        tree::assert_same(&w.master, &w.slave);
    }
}

#[test]
fn a_renamed_file_sends_its_metadata_only() {
    let w = World::new();
    let files = populate(&w);
    w.create("r", &[]);
    w.sync("r");
    std::fs::rename(&files[4], w.master.join("d0/renamed.txt")).unwrap();
    std::fs::rename(&files[40], w.master.join("d0/big-renamed.img")).unwrap();
    let s = w.sync("r");
    assert_eq!(n(&s, "bytes_sent"), 0, "{s}");
    assert_eq!(n(&s, "deletes"), 2, "{s}");
    assert_eq!(n(&s, "files_unchanged") + n(&s, "files_synced"), 2, "{s}");
    tree::assert_same(&w.master, &w.slave);
    assert!(!w.slave.join("d0/f4.txt").exists());
}

#[test]
fn small_edits_of_small_files_go_as_deltas() {
    let w = World::new();
    let files = populate(&w);
    w.create("e", &[]);
    w.sync("e");
    let mut edited = 0;
    let mut total = 0;
    for f in files.iter().take(40).skip(10).step_by(5) {
        let mut data = std::fs::read(f).unwrap();
        let at = data.len() / 2;
        data.splice(at..at, b"an inserted line\n".iter().copied());
        data[10] = b'#';
        total += data.len() as u64;
        std::fs::write(f, data).unwrap();
        edited += 1;
    }
    let s = w.sync("e");
    assert_eq!(n(&s, "files_synced"), edited, "{s}");
    assert_eq!(n(&s, "bytes_literal"), 0, "edits go as deltas: {s}");
    assert!(n(&s, "bytes_delta") > 0, "{s}");
    assert!(
        n(&s, "bytes_delta") * 4 < total,
        "the deltas are a fraction of the files ({total} bytes): {s}"
    );
    tree::assert_same(&w.master, &w.slave);
}
