//! Where spans go and how: the gateway's `telemetry.*` keys over the standard `OTEL_*` variables of the
//! OpenTelemetry specification, resolved by one pure function, [`plan`], from the settings and a lookup of
//! the environment, so that what wins over what is written here and tested.
//!
//! The first source that is set wins; an empty variable is unset:
//!
//! | setting | sources |
//! |---|---|
//! | endpoint | `telemetry.otlp_endpoint` (base URL) → `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as it is) → `OTEL_EXPORTER_OTLP_ENDPOINT` (base URL) → none: no export |
//! | protocol | `telemetry.otlp_protocol` → `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` → `OTEL_EXPORTER_OTLP_PROTOCOL` → `http/protobuf` |
//! | headers | `OTEL_EXPORTER_OTLP_TRACES_HEADERS` → `OTEL_EXPORTER_OTLP_HEADERS` |
//! | `service.name` | `telemetry.service_name` → `OTEL_SERVICE_NAME` → `service.name` in `OTEL_RESOURCE_ATTRIBUTES` → `epoch-gateway` |
//! | other resource attributes | `OTEL_RESOURCE_ATTRIBUTES` |
//! | export queue | `OTEL_BSP_MAX_QUEUE_SIZE` → 2048 spans |
//!
//! For http/protobuf a base URL gets `/v1/traces`; for gRPC every endpoint is the target as it is, and one
//! without a scheme (`collector:4317`) gets `https://`, or `http://` when `OTEL_EXPORTER_OTLP_TRACES_INSECURE`
//! or `OTEL_EXPORTER_OTLP_INSECURE` is `true`.
//!
//! opentelemetry-otlp 0.33 reads some of these variables by itself. Endpoint and protocol are always set in
//! code, which wins there, so its reading never applies. Headers it applies over those set in code: that is
//! why there is no gateway key for them (it could not win), and why [`parse_headers`] parses them exactly
//! as it does, so that the two agree. Resource attributes are built here alone (the SDK's reading, which
//! does not percent-decode, is not used). Left to the SDK: `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`,
//! `…_COMPRESSION`, and the batch processor's `OTEL_BSP_SCHEDULE_DELAY` and `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.

use std::fmt;

use opentelemetry_otlp::{
    OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_INSECURE,
    OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_HEADERS, OTEL_EXPORTER_OTLP_TRACES_INSECURE,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
};
use opentelemetry_sdk::trace::{OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT};

use crate::config::{OtlpProtocol, TelemetrySettings, is_http_url};

/// `service.name` of the spans, from the specification's resource environment variable.
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// Resource attributes as `key=value,key2=value2`, percent-encoded.
pub const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
/// `service.name` when nothing else names the service.
pub const DEFAULT_SERVICE_NAME: &str = "epoch-gateway";
/// The resource attribute naming the service.
const SERVICE_NAME_ATTRIBUTE: &str = "service.name";
/// Appended to a base URL for OTLP/HTTP traces (specification, "Endpoint URLs for OTLP/HTTP").
const HTTP_TRACES_PATH: &str = "/v1/traces";
/// The names of the gateway's keys, as errors and the start-up log show where a value came from.
const ENDPOINT_KEY: &str = "telemetry.otlp_endpoint";

/// Everything the exporter is built from. `Debug` shows header names, never their values.
#[derive(Clone, PartialEq, Eq)]
pub struct ExportPlan {
    pub protocol: OtlpProtocol,
    /// The URL spans are posted to (http/protobuf), or the gRPC target.
    pub endpoint: String,
    /// The key or variable the endpoint came from.
    pub endpoint_from: &'static str,
    /// Sent with every export (HTTP headers, gRPC metadata); names in lower case.
    pub headers: Vec<(String, String)>,
    pub service_name: String,
    /// Resource attributes besides `service.name`, in the order given.
    pub resource: Vec<(String, String)>,
    /// Spans the export queue holds; more are dropped.
    pub queue_size: usize,
}

impl fmt::Debug for ExportPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(name, _)| (name.as_str(), "[redacted]"))
            .collect();
        f.debug_struct("ExportPlan")
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("endpoint_from", &self.endpoint_from)
            .field("headers", &headers)
            .field("service_name", &self.service_name)
            .field("resource", &self.resource)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

/// A standard variable, or a part of one, that was not used. Never holds a value that may be secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub variable: &'static str,
    pub reason: String,
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.reason)
    }
}

/// Why no exporter can be built from the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{from}: '{endpoint}' is not an http:// or https:// URL with a host")]
    Endpoint {
        from: &'static str,
        endpoint: String,
    },
    #[error(
        "{from}: '{endpoint}' needs TLS, which the http/protobuf exporter is built without; use the grpc protocol for https"
    )]
    HttpsOverHttp {
        from: &'static str,
        endpoint: String,
    },
}

/// The outcome of [`plan`]: the plan (`None`: no endpoint anywhere, nothing is exported), and what was
/// ignored on the way (warnings for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub plan: Result<Option<ExportPlan>, PlanError>,
    pub ignored: Vec<Ignored>,
}

/// Resolves the export from `settings` over the variables `env` returns (`std::env::var(…).ok()` in the
/// service, a table in tests).
pub fn plan(settings: &TelemetrySettings, env: impl Fn(&str) -> Option<String>) -> Resolution {
    // The specification: an empty variable is treated as unset.
    let var = |name: &str| env(name).filter(|value| !value.trim().is_empty());
    let mut ignored = Vec::new();

    let endpoint = settings
        .otlp_endpoint
        .clone()
        .map(|endpoint| (endpoint, ENDPOINT_KEY, true))
        .or_else(|| {
            var(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
                .map(|endpoint| (endpoint, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, false))
        })
        .or_else(|| {
            var(OTEL_EXPORTER_OTLP_ENDPOINT)
                .map(|endpoint| (endpoint, OTEL_EXPORTER_OTLP_ENDPOINT, true))
        });
    let Some((endpoint, endpoint_from, is_base)) = endpoint else {
        return Resolution {
            plan: Ok(None),
            ignored,
        };
    };

    let protocol = settings.protocol().unwrap_or_else(|| {
        [
            OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
            OTEL_EXPORTER_OTLP_PROTOCOL,
        ]
        .into_iter()
        .find_map(|variable| {
            let name = var(variable)?;
            let protocol = OtlpProtocol::parse(&name);
            if protocol.is_none() {
                ignored.push(Ignored {
                    variable,
                    reason: format!("'{name}' is not supported; use http/protobuf or grpc"),
                });
            }
            protocol
        })
        .unwrap_or(OtlpProtocol::HttpProtobuf)
    });

    let endpoint = match target(protocol, endpoint.trim(), endpoint_from, is_base, &var) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            return Resolution {
                plan: Err(error),
                ignored,
            };
        }
    };

    let headers = [
        OTEL_EXPORTER_OTLP_TRACES_HEADERS,
        OTEL_EXPORTER_OTLP_HEADERS,
    ]
    .into_iter()
    .find_map(|variable| var(variable).map(|value| (variable, value)))
    .map(|(variable, value)| {
        let (headers, mut bad) = parse_headers(variable, &value);
        ignored.append(&mut bad);
        headers
    })
    .unwrap_or_default();

    let mut resource = match var(OTEL_RESOURCE_ATTRIBUTES).map(|value| parse_attributes(&value)) {
        None => Vec::new(),
        Some(Ok(attributes)) => attributes,
        Some(Err(reason)) => {
            // The specification: on an error the whole value is discarded.
            ignored.push(Ignored {
                variable: OTEL_RESOURCE_ATTRIBUTES,
                reason: format!("{reason}; none of its attributes are used"),
            });
            Vec::new()
        }
    };
    let named_in_attributes = resource
        .iter()
        .rposition(|(key, _)| key == SERVICE_NAME_ATTRIBUTE)
        .map(|at| resource.remove(at).1);
    resource.retain(|(key, _)| key != SERVICE_NAME_ATTRIBUTE);
    let service_name = settings
        .service_name
        .clone()
        .or_else(|| var(OTEL_SERVICE_NAME))
        .or(named_in_attributes)
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());

    // Read as the SDK reads it, which is also given this value in code.
    let queue_size = env(OTEL_BSP_MAX_QUEUE_SIZE)
        .and_then(|size| size.parse().ok())
        .unwrap_or(OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT);

    Resolution {
        plan: Ok(Some(ExportPlan {
            protocol,
            endpoint,
            endpoint_from,
            headers,
            service_name,
            resource,
            queue_size,
        })),
        ignored,
    }
}

/// The URL or target spans are sent to, from a configured `endpoint` (`from` names where it came from;
/// `is_base`: a base URL, which OTLP/HTTP extends with the signal's path).
fn target(
    protocol: OtlpProtocol,
    endpoint: &str,
    from: &'static str,
    is_base: bool,
    var: &impl Fn(&str) -> Option<String>,
) -> Result<String, PlanError> {
    let not_a_url = || PlanError::Endpoint {
        from,
        endpoint: endpoint.to_owned(),
    };
    match protocol {
        OtlpProtocol::HttpProtobuf if !is_http_url(endpoint) => Err(not_a_url()),
        OtlpProtocol::HttpProtobuf if endpoint.starts_with("https://") => {
            Err(PlanError::HttpsOverHttp {
                from,
                endpoint: endpoint.to_owned(),
            })
        }
        OtlpProtocol::HttpProtobuf if is_base => Ok(format!(
            "{}{HTTP_TRACES_PATH}",
            endpoint.trim_end_matches('/')
        )),
        OtlpProtocol::HttpProtobuf => Ok(endpoint.to_owned()),
        OtlpProtocol::Grpc => {
            let target = if endpoint.contains("://") {
                endpoint.to_owned()
            } else {
                let insecure = [
                    OTEL_EXPORTER_OTLP_TRACES_INSECURE,
                    OTEL_EXPORTER_OTLP_INSECURE,
                ]
                .into_iter()
                .find_map(var)
                .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
                let scheme = if insecure { "http" } else { "https" };
                format!("{scheme}://{endpoint}")
            };
            if is_http_url(&target) {
                Ok(target)
            } else {
                Err(not_a_url())
            }
        }
    }
}

/// `key=value,key2=value2` as opentelemetry-otlp 0.33 parses `OTEL_EXPORTER_OTLP_HEADERS` (so that the
/// headers it applies by itself are these): entries split at `,` and trimmed, an entry without `=` or
/// with an empty key or value skipped, the value percent-decoded when it decodes, else taken as written.
/// Entries that are no valid header are left out and reported (by position: values may be secrets).
pub fn parse_headers(variable: &'static str, value: &str) -> (Vec<(String, String)>, Vec<Ignored>) {
    let mut headers = Vec::new();
    let mut ignored = Vec::new();
    for (index, entry) in value.split_terminator(',').map(str::trim).enumerate() {
        let Some((key, raw)) = entry.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = percent_decode(raw.trim()).unwrap_or_else(|| raw.to_owned());
        if key.is_empty() || value.is_empty() {
            continue;
        }
        if is_header_name(key) && is_header_value(&value) {
            headers.push((key.to_ascii_lowercase(), value));
        } else {
            ignored.push(Ignored {
                variable,
                reason: format!(
                    "entry {} is not a valid header name and value; it is not sent",
                    index + 1
                ),
            });
        }
    }
    (headers, ignored)
}

/// `key=value,key2=value2` as the specification defines `OTEL_RESOURCE_ATTRIBUTES`: keys and values
/// percent-decoded and trimmed; any malformed entry makes the whole value invalid.
pub fn parse_attributes(value: &str) -> Result<Vec<(String, String)>, &'static str> {
    let mut attributes = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (key, value) = entry.split_once('=').ok_or("an entry is not key=value")?;
        let key = percent_decode(key.trim()).ok_or("an entry is not percent-encoded UTF-8")?;
        let value = percent_decode(value.trim()).ok_or("an entry is not percent-encoded UTF-8")?;
        if key.is_empty() {
            return Err("an entry has an empty key");
        }
        attributes.push((key, value));
    }
    Ok(attributes)
}

/// `%XX` sequences to bytes, the whole read as UTF-8; `None` for a malformed sequence or bytes that are
/// not UTF-8 (the cases opentelemetry-otlp's decoder refuses too).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        if byte == b'%' {
            let hex = text.get(at + 1..at + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            decoded.push(byte);
            at += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// An HTTP field name (RFC 9110 `token`), which gRPC metadata keys are too.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A field value the `http` crate accepts from text: visible ASCII, spaces and tabs.
fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const COLLECTOR_HTTP: &str = "http://collector:4318";
    const COLLECTOR_GRPC: &str = "http://collector:4317";

    fn settings() -> TelemetrySettings {
        TelemetrySettings::default()
    }

    fn resolve(settings: &TelemetrySettings, env: &[(&str, &str)]) -> Resolution {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        plan(settings, |name| env.get(name).cloned())
    }

    fn planned(settings: &TelemetrySettings, env: &[(&str, &str)]) -> ExportPlan {
        let resolution = resolve(settings, env);
        resolution
            .plan
            .expect("a valid plan")
            .expect("an endpoint is configured")
    }

    fn with_endpoint(endpoint: &str) -> TelemetrySettings {
        let mut settings = settings();
        settings.otlp_endpoint = Some(endpoint.to_owned());
        settings
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        let resolution = resolve(
            &settings(),
            &[
                (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
                (OTEL_SERVICE_NAME, "edge"),
                (OTEL_EXPORTER_OTLP_ENDPOINT, ""),
            ],
        );
        assert_eq!(resolution.plan, Ok(None));
    }

    /// (the gateway's key, the traces variable, the generic variable, protocol) → the target.
    #[test]
    fn endpoint_precedence() {
        let key = Some("http://from-key:4318");
        let traces = Some("http://from-traces:4318/custom/path");
        let generic = Some("http://from-generic:4318/");
        let http = OtlpProtocol::HttpProtobuf;
        let grpc = OtlpProtocol::Grpc;
        let table = [
            (key, traces, generic, http, "http://from-key:4318/v1/traces"),
            (
                None,
                traces,
                generic,
                http,
                "http://from-traces:4318/custom/path",
            ),
            (
                None,
                None,
                generic,
                http,
                "http://from-generic:4318/v1/traces",
            ),
            (key, traces, generic, grpc, "http://from-key:4318"),
            (
                None,
                traces,
                generic,
                grpc,
                "http://from-traces:4318/custom/path",
            ),
            (None, None, generic, grpc, "http://from-generic:4318/"),
        ];
        for (key, traces, generic, protocol, expected) in table {
            let mut settings = settings().with_protocol(protocol);
            settings.otlp_endpoint = key.map(str::to_owned);
            let mut env = Vec::new();
            if let Some(traces) = traces {
                env.push((OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, traces));
            }
            if let Some(generic) = generic {
                env.push((OTEL_EXPORTER_OTLP_ENDPOINT, generic));
            }
            assert_eq!(
                planned(&settings, &env).endpoint,
                expected,
                "{key:?} {traces:?} {generic:?} {protocol:?}"
            );
        }
    }

    /// (the gateway's key, the traces variable, the generic variable) → the protocol.
    #[test]
    fn protocol_precedence() {
        use OtlpProtocol::{Grpc, HttpProtobuf};
        let table = [
            (
                Some(Grpc),
                Some("http/protobuf"),
                Some("http/protobuf"),
                Grpc,
            ),
            (Some(HttpProtobuf), Some("grpc"), Some("grpc"), HttpProtobuf),
            (None, Some("grpc"), Some("http/protobuf"), Grpc),
            (None, Some("HTTP/PROTOBUF"), Some("grpc"), HttpProtobuf),
            (None, None, Some("GRPC"), Grpc),
            (None, Some(""), Some("grpc"), Grpc),
            (None, None, None, HttpProtobuf),
        ];
        for (key, traces, generic, expected) in table {
            let mut settings = with_endpoint(COLLECTOR_GRPC);
            if let Some(protocol) = key {
                settings = settings.with_protocol(protocol);
            }
            let mut env = Vec::new();
            if let Some(traces) = traces {
                env.push((OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, traces));
            }
            if let Some(generic) = generic {
                env.push((OTEL_EXPORTER_OTLP_PROTOCOL, generic));
            }
            let resolution = resolve(&settings, &env);
            assert!(resolution.ignored.is_empty(), "{:?}", resolution.ignored);
            assert_eq!(
                resolution.plan.unwrap().unwrap().protocol,
                expected,
                "{key:?} {traces:?} {generic:?}"
            );
        }
    }

    #[test]
    fn an_unsupported_protocol_variable_is_ignored_with_a_warning() {
        let resolution = resolve(
            &with_endpoint(COLLECTOR_GRPC),
            &[
                (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, "http/json"),
                (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
            ],
        );
        assert_eq!(
            resolution.plan.unwrap().unwrap().protocol,
            OtlpProtocol::Grpc
        );
        assert_eq!(
            resolution.ignored,
            [Ignored {
                variable: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
                reason: "'http/json' is not supported; use http/protobuf or grpc".to_owned(),
            }]
        );
        // The gateway's key decides: the variables are not even read.
        let resolution = resolve(
            &with_endpoint(COLLECTOR_GRPC).with_protocol(OtlpProtocol::Grpc),
            &[(OTEL_EXPORTER_OTLP_PROTOCOL, "bogus")],
        );
        assert!(resolution.ignored.is_empty());
    }

    #[test]
    fn a_grpc_endpoint_without_a_scheme_is_secure_unless_insecure_is_true() {
        let settings = settings().with_protocol(OtlpProtocol::Grpc);
        let table: [(&[(&str, &str)], &str); 5] = [
            (&[], "https://collector:4317"),
            (
                &[(OTEL_EXPORTER_OTLP_INSECURE, "true")],
                "http://collector:4317",
            ),
            (
                &[(OTEL_EXPORTER_OTLP_INSECURE, "TRUE")],
                "http://collector:4317",
            ),
            (
                &[
                    (OTEL_EXPORTER_OTLP_TRACES_INSECURE, "false"),
                    (OTEL_EXPORTER_OTLP_INSECURE, "true"),
                ],
                "https://collector:4317",
            ),
            (
                &[(OTEL_EXPORTER_OTLP_INSECURE, "yes")],
                "https://collector:4317",
            ),
        ];
        for (insecure, expected) in table {
            let mut env = vec![(OTEL_EXPORTER_OTLP_ENDPOINT, "collector:4317")];
            env.extend_from_slice(insecure);
            assert_eq!(planned(&settings, &env).endpoint, expected, "{insecure:?}");
        }
        // A scheme decides by itself.
        let env = [
            (OTEL_EXPORTER_OTLP_ENDPOINT, "https://collector:4317"),
            (OTEL_EXPORTER_OTLP_INSECURE, "true"),
        ];
        assert_eq!(planned(&settings, &env).endpoint, "https://collector:4317");
    }

    #[test]
    fn endpoints_that_cannot_work_are_errors() {
        let http = settings();
        let grpc = settings().with_protocol(OtlpProtocol::Grpc);
        let table = [
            (&http, "collector:4318", "is not an http:// or https:// URL"),
            (&http, "https://collector:4318", "needs TLS"),
            (
                &grpc,
                "unix:///run/collector.sock",
                "is not an http:// or https:// URL",
            ),
            (&grpc, "http://", "is not an http:// or https:// URL"),
        ];
        for (settings, endpoint, problem) in table {
            let resolution = resolve(settings, &[(OTEL_EXPORTER_OTLP_ENDPOINT, endpoint)]);
            let error = resolution.plan.expect_err(endpoint);
            let message = error.to_string();
            assert!(
                message.starts_with(OTEL_EXPORTER_OTLP_ENDPOINT),
                "{message}"
            );
            assert!(message.contains(problem), "{message}");
        }
        // https over gRPC is fine: the gRPC exporter has TLS.
        let env = [(OTEL_EXPORTER_OTLP_ENDPOINT, "https://collector:4317")];
        assert_eq!(planned(&grpc, &env).endpoint, "https://collector:4317");
    }

    /// (the gateway's key, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) → `service.name`.
    #[test]
    fn service_name_precedence() {
        let attributes = Some("service.name=from-attributes,team=edge");
        let table = [
            (
                Some("from-key"),
                Some("from-variable"),
                attributes,
                "from-key",
            ),
            (None, Some("from-variable"), attributes, "from-variable"),
            (None, None, attributes, "from-attributes"),
            (None, Some(""), attributes, "from-attributes"),
            (None, None, None, DEFAULT_SERVICE_NAME),
        ];
        for (key, variable, attributes, expected) in table {
            let mut settings = with_endpoint(COLLECTOR_HTTP);
            settings.service_name = key.map(str::to_owned);
            let mut env = Vec::new();
            if let Some(name) = variable {
                env.push((OTEL_SERVICE_NAME, name));
            }
            if let Some(attributes) = attributes {
                env.push((OTEL_RESOURCE_ATTRIBUTES, attributes));
            }
            let plan = planned(&settings, &env);
            assert_eq!(
                plan.service_name, expected,
                "{key:?} {variable:?} {attributes:?}"
            );
            // `service.name` is never among the other attributes.
            let expected_rest = if attributes.is_some() {
                vec![("team".to_owned(), "edge".to_owned())]
            } else {
                Vec::new()
            };
            assert_eq!(plan.resource, expected_rest);
        }
    }

    #[test]
    fn resource_attributes_are_percent_decoded_or_discarded_whole() {
        assert_eq!(
            parse_attributes(" deployment.environment = prod ,team=real%2Dtime,note=a%2Cb%3Dc,"),
            Ok(vec![
                ("deployment.environment".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "real-time".to_owned()),
                ("note".to_owned(), "a,b=c".to_owned()),
            ])
        );
        assert_eq!(
            parse_attributes("k%C3%A9y=caf%C3%A9"),
            Ok(vec![("kéy".to_owned(), "café".to_owned())])
        );
        assert_eq!(
            parse_attributes("empty="),
            Ok(vec![("empty".to_owned(), String::new())])
        );
        for bad in ["a=1,b", "a=%zz", "a=%C3", "=v", "a=1,%ff=2"] {
            assert!(parse_attributes(bad).is_err(), "{bad}");
        }
        let resolution = resolve(
            &with_endpoint(COLLECTOR_HTTP),
            &[(OTEL_RESOURCE_ATTRIBUTES, "team=edge,service.name")],
        );
        let plan = resolution.plan.unwrap().unwrap();
        assert!(plan.resource.is_empty());
        assert_eq!(plan.service_name, DEFAULT_SERVICE_NAME);
        assert_eq!(resolution.ignored.len(), 1);
        assert_eq!(resolution.ignored[0].variable, OTEL_RESOURCE_ATTRIBUTES);
    }

    /// The cases of opentelemetry-otlp 0.33's own header tests, plus names in upper case.
    #[test]
    fn headers_parse_as_the_exporter_parses_them() {
        let table: [(&str, &[(&str, &str)]); 7] = [
            ("k1=v1", &[("k1", "v1")]),
            ("k1=v1,k2=v2", &[("k1", "v1"), ("k2", "v2")]),
            ("k1=v1=10,k2,k3", &[("k1", "v1=10")]),
            ("k1=v1,,,k2,k3=10", &[("k1", "v1"), ("k3", "10")]),
            (
                "Authorization=Basic%20AAA",
                &[("authorization", "Basic AAA")],
            ),
            ("k1=%XX", &[("k1", "%XX")]),
            ("=v1,k1=, X-Tenant = forum ", &[("x-tenant", "forum")]),
        ];
        for (value, expected) in table {
            let (headers, ignored) = parse_headers(OTEL_EXPORTER_OTLP_HEADERS, value);
            let expected: Vec<(String, String)> = expected
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            assert_eq!(headers, expected, "{value}");
            assert!(ignored.is_empty(), "{value}");
        }
        // Not a header: left out, reported without its value.
        let (headers, ignored) = parse_headers(
            OTEL_EXPORTER_OTLP_HEADERS,
            "ok=1,bad name=secret,x=caf%C3%A9",
        );
        assert_eq!(headers, [("ok".to_owned(), "1".to_owned())]);
        assert_eq!(ignored.len(), 2);
        assert!(ignored.iter().all(|i| !i.reason.contains("secret")));
    }

    #[test]
    fn header_values_never_print() {
        let plan = planned(
            &with_endpoint(COLLECTOR_HTTP),
            &[(OTEL_EXPORTER_OTLP_HEADERS, "authorization=Bearer%20hunter2")],
        );
        let shown = format!("{plan:?}");
        assert!(shown.contains("authorization"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn signal_headers_replace_the_generic_ones() {
        let env = [
            (OTEL_EXPORTER_OTLP_TRACES_HEADERS, "a=traces"),
            (OTEL_EXPORTER_OTLP_HEADERS, "a=generic,b=generic"),
        ];
        assert_eq!(
            planned(&with_endpoint(COLLECTOR_HTTP), &env).headers,
            [("a".to_owned(), "traces".to_owned())]
        );
        let env = [(OTEL_EXPORTER_OTLP_HEADERS, "a=generic,b=generic")];
        assert_eq!(
            planned(&with_endpoint(COLLECTOR_HTTP), &env).headers.len(),
            2
        );
    }

    #[test]
    fn queue_size_as_the_batch_processor_reads_it() {
        let plan = |size: &str| {
            planned(
                &with_endpoint(COLLECTOR_HTTP),
                &[(OTEL_BSP_MAX_QUEUE_SIZE, size)],
            )
            .queue_size
        };
        assert_eq!(plan("100"), 100);
        assert_eq!(plan("lots"), OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT);
        assert_eq!(
            planned(&with_endpoint(COLLECTOR_HTTP), &[]).queue_size,
            OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("v%201").as_deref(), Some("v 1"));
        assert_eq!(percent_decode("v 1").as_deref(), Some("v 1"));
        assert_eq!(
            percent_decode("%C3%B6%C3%A0%C2%A7%C3%96abcd%C3%84").as_deref(),
            Some("öà§ÖabcdÄ")
        );
        for bad in ["v%XX1", "%", "%4", "%C3", "%é1"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }
}
