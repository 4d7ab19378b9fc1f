//! What a gRPC server's reflection (`grpc.reflection.v1`) says it serves.

use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// The services gRPC reflection lists on `channel`, sorted by name; panics
/// unless each of them also resolves to its file descriptor (what grpcurl
/// asks next).
pub async fn reflected_services(channel: tonic::transport::Channel) -> Vec<String> {
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = reflection
        .server_reflection_info(futures::stream::iter([ask(MessageRequest::ListServices(
            String::new(),
        ))]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply: {reply:?}");
    };
    let mut services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    let requests: Vec<_> = services
        .iter()
        .map(|name| ask(MessageRequest::FileContainingSymbol(name.clone())))
        .collect();
    let mut stream = reflection
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    for name in &services {
        let reply = stream.message().await.unwrap().unwrap();
        assert!(
            matches!(
                reply.message_response,
                Some(MessageResponse::FileDescriptorResponse(_))
            ),
            "{name} does not resolve: {reply:?}"
        );
    }
    services.sort();
    services
}
