//! Fuzzes the server's handling of request bytes from the network: the
//! protobuf decoding of a join, download or upload request, then the same
//! validation and application that the gRPC handlers run.
//!
//! The first byte picks the request type; the rest is the protobuf body. A
//! failure is a panic, or global parameters that stop being finite or
//! change in number.

#![no_main]

use std::sync::{Arc, LazyLock};

use dssgd_proto::v1 as pb;
use dssgd_server::{ServerConfig, Service, Store};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const N: u64 = 1000;

/// A server that participant "p1" has initialised with a 1000-parameter
/// model, shared by every input so that uploads accumulate.
static SERVER: LazyLock<(Service, Arc<Store>)> = LazyLock::new(|| {
    let store = Arc::new(Store::new());
    let service = Service::new(Arc::clone(&store), ServerConfig::default());
    let values: Vec<u8> = (0..N)
        .flat_map(|i| (i as f32 * 0.001).to_le_bytes())
        .collect();
    service
        .handle_join(pb::JoinRequest {
            participant_id: "p1".into(),
            model: Some(pb::ModelInfo {
                name: "toy".into(),
                parameter_count: N,
                layout_hash: "0123456789abcdef".into(),
            }),
            initial_parameters: Some(pb::SparseSlice {
                values: values.into(),
                dense: true,
                ..Default::default()
            }),
        })
        .expect("the initial join is valid");
    (service, store)
});

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let (service, store) = &*SERVER;
    match kind % 3 {
        0 => {
            if let Ok(request) = pb::UploadRequest::decode(body) {
                let _ = service.handle_upload(request);
            }
        }
        1 => {
            if let Ok(request) = pb::JoinRequest::decode(body) {
                let _ = service.handle_join(request);
            }
        }
        _ => {
            if let Ok(request) = pb::DownloadRequest::decode(body) {
                let _ = service.handle_download(request);
            }
        }
    }
    let (parameters, _) = store.parameters();
    assert_eq!(parameters.len() as u64, N, "the parameter count changed");
    assert!(
        parameters.iter().all(|value| value.is_finite()),
        "a global parameter is not finite"
    );
});
