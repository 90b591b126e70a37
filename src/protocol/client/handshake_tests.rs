//! The handshake against agents of other protocol versions.

use super::*;
use crate::protocol::{write_frame, ErrorKind};

/// A peer of protocol 5 (before compression and streams) is refused
/// with a message naming the fix; nothing is sent to it uncompressed
/// or otherwise.
#[tokio::test]
async fn an_older_agent_is_refused_at_the_handshake() {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(ours);
    let agent = tokio::spawn(async move {
        let (mut tr, mut tw) = tokio::io::split(theirs);
        let mut out = BANNER.to_vec();
        write_frame(
            &mut out,
            &Response {
                id: 1,
                last: true,
                result: Ok(Reply::HelloOk {
                    version: 5,
                    agent: "0.0.5".into(),
                    root: "/r".into(),
                }),
            },
        )
        .unwrap();
        tw.write_all(&out).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tr.read_to_end(&mut got)).await;
        got
    });
    let err = match Client::connect(r, w, Duration::from_secs(30)).await {
        Err(e) => e,
        Ok(_) => panic!("a protocol-5 agent was accepted"),
    };
    match &err {
        ProtoError::Remote(e) => {
            assert_eq!(e.kind, ErrorKind::Version);
            assert!(e.message.contains("install the same georep version"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // Only the Hello went out.
    let sent = agent.await.unwrap();
    let hello = encode_frame(&Envelope {
        id: 1,
        body: Request::Hello {
            version: PROTOCOL_VERSION,
            client: client_name(),
        },
    })
    .unwrap();
    assert_eq!(sent, hello);
}
