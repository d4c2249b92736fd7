//! Connecting to sluiced's gRPC API over its Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::proto::dataplane_client::DataplaneClient;

/// A client for the daemon listening on `socket`. `timeout` bounds the connect and every request.
pub async fn connect(
    socket: &Path,
    timeout: Duration,
) -> Result<DataplaneClient<Channel>, tonic::transport::Error> {
    connect_with(socket, timeout, timeout).await
}

/// Like [`connect`] with separate bounds: an absent daemon is noticed within `connect_timeout`,
/// while a request may wait up to `request_timeout` (e.g. behind a large service update).
pub async fn connect_with(
    socket: &Path,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<DataplaneClient<Channel>, tonic::transport::Error> {
    let socket: PathBuf = socket.to_owned();
    // The URI is required by the API and ignored: the connector dials the socket.
    let channel = Endpoint::from_static("http://sluiced.invalid")
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .connect_with_connector(service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await?;
    Ok(DataplaneClient::new(channel))
}
