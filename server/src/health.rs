//! The standard gRPC health service (`grpc.health.v1.Health`) and the client
//! check behind `dssgd-server health`, which container health checks run.
//!
//! The server reports `SERVING` for the overall server (the empty service
//! name) and for [`SERVICE_NAME`] while it accepts calls, and `NOT_SERVING`
//! for both once shutdown has begun.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use dssgd_proto::v1::parameter_server_server::ParameterServerServer;
use tonic::server::NamedService;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

use crate::Service;

/// Full gRPC name of the parameter server service, as health checks name it.
pub const SERVICE_NAME: &str = <ParameterServerServer<Service> as NamedService>::NAME;

/// Creates the health service with the parameter server and the overall
/// server marked `SERVING`, and the reporter that changes their status.
pub async fn serving() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<ParameterServerServer<Service>>()
        .await;
    (reporter, service)
}

/// Marks the parameter server and the overall server `NOT_SERVING`.
pub async fn set_not_serving(reporter: &HealthReporter) {
    reporter
        .set_not_serving::<ParameterServerServer<Service>>()
        .await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

/// Returns the `http://` address a probe on the same host uses to reach a
/// server listening on `listen`: a wildcard address (`0.0.0.0` or `::`)
/// becomes the loopback address of the same family.
pub fn local_probe_address(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// Calls `grpc.health.v1.Health/Check` for `service` (empty for the whole
/// server) on the server at `address` and returns the reported status name
/// (`SERVING`, `NOT_SERVING`, `UNKNOWN` or `SERVICE_UNKNOWN`). Connecting
/// and the call together must finish within `timeout`. An `https://`
/// address is reached with `tls`.
pub async fn check(
    address: &str,
    service: &str,
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
) -> anyhow::Result<String> {
    let mut endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|error| anyhow::anyhow!("invalid server address {address:?}: {error}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let call = async {
        let channel = endpoint.connect().await?;
        let request = HealthCheckRequest {
            service: service.to_string(),
        };
        let response = HealthClient::new(channel).check(request).await?;
        anyhow::Ok(response.into_inner().status)
    };
    let status = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| anyhow::anyhow!("health check of {address} timed out after {timeout:?}"))?
        .map_err(|error| anyhow::anyhow!("health check of {address} failed: {error:#}"))?;
    let name = WireStatus::try_from(status)
        .map(|status| status.as_str_name().to_string())
        .unwrap_or_else(|_| format!("invalid status {status}"));
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_matches_the_proto() {
        assert_eq!(SERVICE_NAME, "dssgd.v1.ParameterServer");
    }

    #[test]
    fn wildcard_listen_address_is_probed_on_loopback() {
        let cases = [
            ("0.0.0.0:50051", "http://127.0.0.1:50051"),
            ("[::]:7000", "http://[::1]:7000"),
            ("10.1.2.3:80", "http://10.1.2.3:80"),
        ];
        for (listen, expected) in cases {
            assert_eq!(
                local_probe_address(listen.parse().unwrap()),
                expected,
                "{listen}"
            );
        }
    }

    #[tokio::test]
    async fn check_reports_serving_then_not_serving() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let (reporter, service) = serving().await;
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let timeout = Duration::from_secs(5);
        for name in ["", SERVICE_NAME] {
            let status = check(&address, name, timeout, None).await.unwrap();
            assert_eq!(status, "SERVING", "service {name:?}");
        }
        let unknown = check(&address, "other.Service", timeout, None).await;
        assert!(unknown.is_err(), "an unknown service should fail the check");

        set_not_serving(&reporter).await;
        for name in ["", SERVICE_NAME] {
            let status = check(&address, name, timeout, None).await.unwrap();
            assert_eq!(status, "NOT_SERVING", "service {name:?}");
        }
        server.abort();
    }

    #[tokio::test]
    async fn check_of_closed_port_fails() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("http://127.0.0.1:{port}");
        let error = check(&address, "", Duration::from_secs(2), None)
            .await
            .unwrap_err();
        assert!(error.to_string().contains(&address), "{error}");
    }
}
