//! Online resize at the vhost-user protocol level, with the server in this process (the
//! control plane's call, `ServerHandle::resize`, has no trigger from outside yet) and the
//! `vhost` crate's frontend: after the resize the server sends
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend request channel and waits for its ack,
//! GET_CONFIG reports the new capacity, and the size persists across a restart.

use fvd::engine::{CreateParams, Image};
use fvd::io::executor::block_on;
use fvd::io::host_file::OpenMode;
use fvd::io::sync::SyncIo;
use fvd::io::HostFile;
use fvd::server::{ServeConfig, Server};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::VhostBackend;

const MIB: u64 = 1 << 20;

fn config(image: &std::path::Path, socket: &std::path::Path) -> ServeConfig {
    ServeConfig {
        format: Some(fvd::engine::Format::Fvd),
        queue_size: 64,
        once: true,
        // Filters would bind the test process's threads.
        seccomp: fvd::server::seccomp::SeccompMode::Off,
        ..ServeConfig::new(image.to_path_buf(), Some(socket.to_path_buf()))
    }
}

/// The frontend's handler of backend requests: counts CONFIG_CHANGE_MSGs.
#[derive(Default)]
struct ConfigChanges(AtomicUsize);

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

fn capacity(fe: &mut Frontend) -> u64 {
    let (_, cfg) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap();
    u64::from_le_bytes(cfg[..8].try_into().unwrap()) * 512
}

#[test]
fn resize_tells_the_frontend_and_persists() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = d.path().join("disk.fvd");
    let f = HostFile::open(&image, OpenMode::Create).unwrap();
    let p = CreateParams {
        virtual_size: 8 * MIB,
        max_size: Some(64 * MIB),
        ..Default::default()
    };
    block_on(Image::create(&SyncIo, f, &p)).unwrap();
    let socket = d.path().join("s.sock");
    let server = Server::bind(config(&image, &socket)).unwrap();
    let handle = server.handle();
    let run = std::thread::spawn(move || server.run());

    let sock = UnixStream::connect(&socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut fe = Frontend::from_stream(sock, 1);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let offered = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ;
    assert!(offered.contains(want), "offered {offered:?}");
    fe.set_protocol_features(want).unwrap();
    // The frontend's side of the backend channel, as the vhost crate's frontend serves it: one
    // CONFIG_CHANGE_MSG, acknowledged (REPLY_ACK).
    let changes = Arc::new(ConfigChanges::default());
    let mut channel = FrontendReqHandler::new(changes.clone()).unwrap();
    channel.set_reply_ack_flag(true);
    // SAFETY: the handler owns this descriptor and outlives the call that sends it.
    let tx = unsafe { BorrowedFd::borrow_raw(channel.get_tx_raw_fd()) };
    fe.set_backend_request_fd(&tx).unwrap();
    assert_eq!(capacity(&mut fe), 8 * MIB);

    // On a thread of its own, with a deadline: a message that never comes fails the test.
    let (done, handled) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = channel.handle_request().map(|_| ());
        let _ = done.send((r, channel));
    });
    handle.resize(24 * MIB).unwrap();
    let (r, _channel) = handled
        .recv_timeout(Duration::from_secs(30))
        .expect("no CONFIG_CHANGE_MSG within 30 s");
    r.unwrap();
    assert_eq!(changes.0.load(Ordering::SeqCst), 1);
    assert_eq!(capacity(&mut fe), 24 * MIB);

    // A served disk does not shrink; past the reserved room is refused too.
    let e = handle.resize(4 * MIB).unwrap_err();
    assert!(e.to_string().contains("cannot shrink"), "{e}");
    assert!(handle.resize(1 << 40).is_err());
    assert_eq!(capacity(&mut fe), 24 * MIB);

    drop(fe);
    run.join().unwrap().unwrap();
    // The handle shares the disk (and so its lock) until dropped.
    drop(handle);
    let img = block_on(fvd::engine::open_image(&SyncIo, &image, true)).unwrap();
    assert_eq!(img.virtual_size(), 24 * MIB, "the size did not persist");
}
