//! The real server binary publishes its services through gRPC server
//! reflection, so generic tools (grpcurl, grpcui) can call it without the
//! .proto file.

use dssgd_tests::start_server;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

async fn ask(address: &str, request: MessageRequest) -> ServerReflectionResponse {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .expect("the address is valid")
        .connect()
        .await
        .expect("connecting to the server failed");
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("the reflection call failed")
        .into_inner();
    responses
        .message()
        .await
        .expect("reading the reflection response failed")
        .expect("the server sent no reflection response")
}

#[test]
fn reflection_lists_services_and_serves_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, address) = start_server(&[], &dir.path().join("server.log"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let listed = runtime.block_on(ask(&address, MessageRequest::ListServices(String::new())));
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("unexpected response {listed:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "dssgd.v1.ParameterServer",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    let symbol = runtime.block_on(ask(
        &address,
        MessageRequest::FileContainingSymbol("dssgd.v1.ParameterServer".into()),
    ));
    let Some(MessageResponse::FileDescriptorResponse(files)) = symbol.message_response else {
        panic!("unexpected response {symbol:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    let file = String::from_utf8_lossy(&files.file_descriptor_proto[0]).to_string();
    assert!(file.contains("dssgd/v1/dssgd.proto"), "{file}");
    assert!(file.contains("UploadGradients"), "{file}");
}
