//! The gRPC server: takes a bound listener and a shutdown future, so tests
//! bind `127.0.0.1:0` first and never sleep waiting for start-up.

use std::future::Future;
use std::sync::Arc;

use ordervault_proto::v1;
use ordervault_proto::v1::admin_service_server::AdminServiceServer;
use ordervault_proto::v1::token_service_server::TokenServiceServer;
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::engine::Engine;
use crate::service::TokenApi;
use crate::service_admin::AdminApi;

/// The transport refuses messages above this with `OUT_OF_RANGE`; messages
/// between [`ordervault_proto::codec::MAX_MESSAGE_BYTES`] and this get the
/// codec's `RESOURCE_EXHAUSTED`.
const TRANSPORT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Serves the vault's services, health and reflection on `listener` until
/// `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TokenServiceServer<TokenApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let admin = AdminServiceServer::new(AdminApi::new(engine.clone()));
    let audit = ordervault_proto::v1::audit_service_server::AuditServiceServer::new(
        crate::service_audit::AuditApi::new(engine.clone()),
    );
    let checkpointer = tokio::spawn(checkpoints(engine.clone()));
    let refresher = engine
        .store()
        .shared()
        .then(|| tokio::spawn(refresh(engine.clone())));
    let tokens = TokenServiceServer::new(TokenApi::new(engine))
        .max_decoding_message_size(TRANSPORT_MAX_MESSAGE_BYTES);
    let mut builder = Server::builder();
    let router = builder
        .add_service(health_service)
        .add_service(tokens)
        .add_service(admin)
        .add_service(audit);
    let router = match reflection {
        Ok(r) => router.add_service(r),
        Err(e) => {
            tracing::warn!(error = %e, "gRPC reflection disabled");
            router
        }
    };
    let served = router
        // Nagle off on accepted connections: replies written in several
        // frames would otherwise wait ~40 ms for a delayed ACK. (The
        // builder's tcp_nodelay does not apply to a given listener.)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    checkpointer.abort();
    if let Some(r) = refresher {
        r.abort();
    }
    served
}

/// How often a node of a shared store re-reads keys, principals and the
/// policy: the longest a rotation, revocation or policy reload through
/// another node takes to apply here.
pub const SHARED_STATE_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

async fn refresh(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(SHARED_STATE_REFRESH);
    loop {
        tick.tick().await;
        if let Err(e) = engine.refresh_shared_state().await {
            tracing::warn!(error = %e, "cannot refresh the shared state");
        }
    }
}

/// Signs a checkpoint of this node's audit chain whenever enough events or
/// time have passed (see [`crate::auditor`]).
async fn checkpoints(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        if engine.checkpoint_due().await
            && let Err(e) = engine.checkpoint_now().await
        {
            tracing::error!(error = %e, "cannot sign an audit checkpoint");
        }
    }
}
