//! Writes the seed corpus (`corpus/TARGET/`): `cargo run --bin seeds` in
//! this directory; the files are kept in the repository.
use georep::catalog::cdp;
use georep::fs::meta::Meta;
use georep::fs::relpath::RelPath;
use georep::protocol::{encode_frame, Envelope, Reply, Request, Response};
use serde_bytes::ByteBuf;

fn save(target: &str, name: &str, data: &[u8]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn main() {
    let p = |s: &str| RelPath::new(s.as_bytes().to_vec()).unwrap();
    // frame: a few requests and replies, back to back.
    let mut frames = Vec::new();
    for body in [
        Request::Ping,
        Request::ListDir { path: p("d/e") },
        Request::PutFile {
            path: p("a"),
            data: ByteBuf::from(b"hello".to_vec()),
            digest: [1; 32],
            meta: Meta::default(),
        },
        Request::WindowHashes {
            fid: 3,
            offset: 0,
            len: 1 << 22,
            window: 1 << 22,
        },
    ] {
        frames.extend(encode_frame(&Envelope { id: 7, body }).unwrap());
    }
    save("frame", "requests", &frames);
    let r = Response {
        id: 9,
        last: true,
        result: Ok(Reply::Extents(vec![(0, 4096), (8192, 4096)])),
    };
    save("frame", "reply", &encode_frame(&r).unwrap());
    // delta: basis length (u16), limit byte, basis, new data.
    let mut d = vec![200, 0, 40];
    d.extend((0..200u32).map(|i| (i * 7) as u8));
    d.extend((0..300u32).map(|i| (i * 7 + (i / 50)) as u8));
    save("delta", "shifted", &d);
    // journal: verify flag, then a journal of three points.
    let h = cdp::Header {
        block_size: 512,
        disk_size: 1 << 16,
        start: 10,
        base_time: 10,
        base_name: "base.qcow2".into(),
    };
    let mut j = vec![1];
    j.extend(h.encode().unwrap());
    j.extend(cdp::encode_point(11, &[(0, &[1u8; 512])]));
    j.extend(cdp::encode_point(
        12,
        &[(512, &[2u8; 1024]), (4096, &[3u8; 512])],
    ));
    j.extend(cdp::encode_point(13, &[]));
    save("journal", "three-points", &j);
    // agent: op bytes (see `Ops::next`): open, write, commit with the
    // model's digest; put a file; list; read; remove; set metadata.
    save(
        "agent",
        "write-commit",
        &[7, 0, 3, 0x10, 0, 0, 0, 12, 0, 3, 0, 0, 2, 16, 0, 1, 0],
    );
    save(
        "agent",
        "put-list-read",
        &[18, 0, 1, 1, 1, 0, 0, 0, 0, 1, 21, 0, 0, 3, 0, 0, 3, 0, 0],
    );
    save(
        "agent",
        "tree-ops",
        &[
            2, 0, 3, 1, 4, 0, 2, 9, 0, 0, 5, 0, 1, 0, 6, 0, 10, 2, 3, 0, 3, 0, 4, 19, 0,
        ],
    );
    save(
        "agent",
        "in-place",
        &[
            8, 1, 3, 0x10, 0, 0, 14, 1, 3, 0, 0, 3, 0x10, 0, 9, 1, 3, 0, 0, 1, 22, 22, 16, 1, 1, 0,
        ],
    );
}
