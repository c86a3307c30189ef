//! The REST/JSON gateway, generated at run time from the `google.api.http`
//! annotations of the service.
//!
//! No HTTP route is written by hand. At start-up [`Gateway::from_descriptors`]
//! reads the encoded descriptor set (the one `build.rs` writes with extension
//! options kept), finds the `google.api.http` rule of every method of the
//! service, and compiles each binding's path template (`/v1/webhooks/{id}`,
//! `{name=shelves/*}`, `{path=**}`, a trailing `:verb`). [`router`] then
//! answers every request from one axum fallback handler, because axum's own
//! router cannot express a custom verb such as `/v1/webhooks/{id}:confirm`.
//!
//! A matched request is transcoded into a `prost_reflect::DynamicMessage` of
//! the method's input type (path variables, then the JSON body per the rule's
//! `body`, then URL query parameters), encoded, framed as gRPC, and sent to
//! the tonic service *in-process*, exactly as a gRPC client's request would
//! arrive. This is deliberate: there is one code path behind both protocols,
//! so authentication, validation, tenancy checks and error mapping are
//! identical by construction. The gateway knows nothing about webhooks; it
//! only knows the descriptors. The gRPC answer is turned back into proto3
//! canonical JSON, or into a `google.rpc.Status`-shaped JSON error whose HTTP
//! status comes from [`crate::error::http_status`], the one mapping from gRPC
//! code to HTTP status. Two answers do not come from a gRPC code, because they
//! are about HTTP itself and never reach the service: a path that exists
//! under another HTTP method (405, code UNIMPLEMENTED) and a request body
//! above [`MAX_REQUEST_BODY_BYTES`] (413, code RESOURCE_EXHAUSTED).
//!
//! Server-streaming methods answer `text/event-stream`: one `data:` event
//! per response message, and `event: error` carrying the status when the
//! stream ends with an error. [`Gateway::with_sse`] can name, per method, a
//! field that becomes the SSE `id:`, an output field that marks a message
//! as a comment (a heartbeat), and the request field that a
//! `Last-Event-ID` header fills, so that a reconnecting client resumes. The body is streamed as the messages arrive,
//! and dropping the HTTP response drops the gRPC stream. Only a
//! trailers-only gRPC answer (the method failed before it produced a stream)
//! is turned into a plain JSON error with its mapped HTTP status: once the
//! gRPC response headers have arrived the SSE headers are sent, so that a
//! quiet live stream does not keep the client waiting for headers.
//!
//! Transcoding follows `google/api/http.proto`: fields bound by the path come
//! from the URL (percent-decoded; a multi-segment variable keeps `%2F`);
//! with `body: "*"` every other field comes from the JSON body and query
//! parameters are refused; with `body: "<field>"` that field is the body;
//! all remaining fields may be set by query parameters (scalars, repeated
//! scalars, enums by name or number, a few well-known types, dotted paths
//! for nested messages). A path variable wins over the same field in the
//! body, so the URL always says which resource is addressed. The JSON body is
//! read with unknown fields denied, and accepts both lowerCamelCase and the
//! original proto names, as the proto3 JSON mapping requires.

use std::{borrow::Cow, collections::HashSet, convert::Infallible, sync::Arc};

use axum::{Router, body::Body as AxumBody, extract::Request, response::Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use percent_encoding::percent_decode_str;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, ReflectMessage, SerializeOptions, Value,
};
use serde_json::Value as Json;
use tonic::Code;
use tower::{Service, ServiceExt};

use crate::error::http_status;

mod openapi;

/// The largest request body the gateway reads by default; a larger one
/// answers 413. `Gateway::with_max_request_bytes` sets it (`api.max_request_bytes`).
pub const MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;

/// The name of the HTTP annotation extension on `MethodOptions`.
const HTTP_EXTENSION: &str = "google.api.http";

/// Why a gateway could not be built from a descriptor set.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot decode the descriptor set")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("service `{0}` is not in the descriptor set")]
    ServiceNotFound(String),
    #[error("the descriptor set does not define the `{HTTP_EXTENSION}` extension")]
    HttpExtensionMissing,
    #[error("{method}: path template `{template}`")]
    Template {
        method: String,
        template: String,
        #[source]
        source: TemplateError,
    },
    #[error("{method}: {message}")]
    Binding { method: String, message: String },
}

/// A path template that does not follow the grammar of `google/api/http.proto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

/// The REST routes of one gRPC service, compiled from its HTTP annotations.
///
/// Build it once at start-up and share it with [`router`].
#[derive(Debug)]
pub struct Gateway {
    routes: Vec<Route>,
    max_request_bytes: usize,
}

impl Gateway {
    /// Sets the largest request body read (`api.max_request_bytes`).
    pub fn with_max_request_bytes(mut self, max: usize) -> Self {
        self.max_request_bytes = max;
        self
    }

    /// Compiles the `google.api.http` bindings of every method of `service`
    /// found in the encoded `FileDescriptorSet` `fds`. Methods without an
    /// annotation stay gRPC-only.
    pub fn from_descriptors(fds: &[u8], service: &str) -> Result<Gateway, GatewayError> {
        let pool = DescriptorPool::decode(fds)?;
        let service_desc = pool
            .get_service_by_name(service)
            .ok_or_else(|| GatewayError::ServiceNotFound(service.to_owned()))?;
        let extension = pool
            .get_extension_by_name(HTTP_EXTENSION)
            .ok_or(GatewayError::HttpExtensionMissing)?;

        let mut routes: Vec<Route> = Vec::new();
        for method in service_desc.methods() {
            let options = method.options();
            if !options.has_extension(&extension) {
                continue;
            }
            let binding_error = |message: String| GatewayError::Binding {
                method: method.full_name().to_owned(),
                message,
            };
            let rule = match options.get_extension(&extension).as_ref() {
                Value::Message(rule) => rule.clone(),
                _ => return Err(binding_error("`google.api.http` is not a message".into())),
            };
            if method.is_client_streaming() {
                return Err(binding_error(
                    "client-streaming methods cannot be transcoded from HTTP".into(),
                ));
            }
            let mut bindings = Vec::new();
            read_http_rule(&rule, true, &mut bindings).map_err(binding_error)?;
            for binding in bindings {
                let route = Route::compile(service, &method, binding)?;
                if let Some(other) = routes.iter().find(|r| r.conflicts_with(&route)) {
                    return Err(binding_error(format!(
                        "binding `{} {}` duplicates the one of {}",
                        route.method_label(),
                        route.template_text,
                        other.method.full_name()
                    )));
                }
                routes.push(route);
            }
        }
        Ok(Gateway {
            routes,
            max_request_bytes: MAX_REQUEST_BODY_BYTES,
        })
    }

    /// Gives the routes of the server-streaming `method` (its simple name,
    /// e.g. `StreamEvents`) SSE ids, comments and `Last-Event-ID`.
    pub fn with_sse(mut self, method: &str, binding: SseBinding<'_>) -> Result<Self, GatewayError> {
        let mut found = false;
        for route in self.routes.iter_mut().filter(|r| r.method.name() == method) {
            let error = |message: String| GatewayError::Binding {
                method: route.method.full_name().to_owned(),
                message,
            };
            if !route.server_streaming {
                return Err(error("SSE needs a server-streaming method".into()));
            }
            let output = route.method.output();
            let names = |path: &str| path.split('.').map(str::to_owned).collect::<Vec<_>>();
            let id = resolve_field_path(&output, &names(binding.id), false)
                .map_err(|e| error(format!("SSE id `{}`: {e}", binding.id)))?;
            let comment = output
                .get_field_by_name(binding.comment)
                .ok_or_else(|| error(format!("SSE comment field `{}`", binding.comment)))?;
            let resume = route
                .method
                .input()
                .get_field_by_name(binding.last_event_id)
                .filter(|f| !f.is_list() && !f.is_map())
                .ok_or_else(|| error(format!("Last-Event-ID field `{}`", binding.last_event_id)))?;
            route.sse = Some(SseFields {
                id,
                comment,
                resume,
            });
            found = true;
        }
        if !found {
            return Err(GatewayError::Binding {
                method: method.to_owned(),
                message: "no REST binding of that name".into(),
            });
        }
        Ok(self)
    }

    /// Finds the route for an HTTP method and a raw (still percent-encoded)
    /// path. When several templates match, the most specific one wins: a
    /// custom verb first, then more literal segments, then no `**`.
    fn lookup(&self, method: &Method, path: &str) -> Lookup<'_> {
        let mut best: Option<(&Route, Vec<String>)> = None;
        let mut allowed: Vec<Method> = Vec::new();
        for route in &self.routes {
            let Some(captures) = route.template.match_path(path) else {
                continue;
            };
            if route.accepts(method) {
                let better = best.as_ref().is_none_or(|(current, _)| {
                    route.template.specificity() > current.template.specificity()
                });
                if better {
                    best = Some((route, captures));
                }
            } else if let Some(m) = &route.http_method {
                allowed.push(m.clone());
            }
        }
        match best {
            Some((route, captures)) => Lookup::Found(route, captures),
            None if !allowed.is_empty() => {
                let mut names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
                names.sort_unstable();
                names.dedup();
                Lookup::MethodNotAllowed(names.join(", "))
            }
            None => Lookup::NotFound,
        }
    }
}

/// How the messages of a server-streaming method map onto Server-Sent
/// Events beyond `data:` (see [`Gateway::with_sse`]).
#[derive(Debug, Clone, Copy)]
pub struct SseBinding<'a> {
    /// Dotted field path of a message's SSE `id:`, e.g. `event.event_id`.
    pub id: &'a str,
    /// A top-level output field: a message that has it set is sent as an
    /// SSE comment (a heartbeat), which clients do not see as an event.
    pub comment: &'a str,
    /// The request field that the `Last-Event-ID` header sets when the
    /// request leaves it unset (a reconnecting `EventSource` sends it).
    pub last_event_id: &'a str,
}

#[derive(Debug, Clone)]
struct SseFields {
    id: Vec<FieldDescriptor>,
    comment: FieldDescriptor,
    resume: FieldDescriptor,
}

/// What the route table says about a request.
#[derive(Debug)]
enum Lookup<'a> {
    /// The route and the raw captures of its path variables, in order.
    Found(&'a Route, Vec<String>),
    /// The path exists under these methods (the `Allow` header).
    MethodNotAllowed(String),
    NotFound,
}

/// Builds the axum router that serves the REST API by calling `grpc`
/// in-process. In production `grpc` is the tonic `WebhookServiceServer`
/// (with its interceptors, if any), the same service the gRPC port serves.
pub fn router<S>(gateway: Arc<Gateway>, grpc: S) -> Router
where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    Router::new().fallback(move |request: Request| {
        let gateway = Arc::clone(&gateway);
        let grpc = grpc.clone();
        async move {
            match handle(&gateway, grpc, request).await {
                Ok(response) => response,
                Err(failure) => failure.into_response(),
            }
        }
    })
}

/// Serves one REST request.
async fn handle<S>(gateway: &Gateway, grpc: S, request: Request) -> Result<Response, Failure>
where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Send,
    S::Future: Send,
{
    let (parts, body) = request.into_parts();
    let (route, captures) = match gateway.lookup(&parts.method, parts.uri.path()) {
        Lookup::Found(route, captures) => (route, captures),
        Lookup::MethodNotAllowed(allow) => {
            return Err(Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                format!(
                    "method {} is not allowed on {}; allowed: {allow}",
                    parts.method,
                    parts.uri.path()
                ),
            )
            .with_allow(allow));
        }
        Lookup::NotFound => {
            return Err(Failure::grpc(
                Code::NotFound,
                format!("no route for {} {}", parts.method, parts.uri.path()),
            ));
        }
    };

    let body = read_body(&parts.headers, body, gateway.max_request_bytes).await?;
    let mut input = route
        .transcode(&captures, parts.uri.query(), &body)
        .map_err(|message| Failure::grpc(Code::InvalidArgument, message))?;
    if let Some(sse) = &route.sse
        && let Some(last) = parts.headers.get("last-event-id")
        && !input.has_field(&sse.resume)
    {
        let value = last
            .to_str()
            .map_err(|_| "is not ASCII".to_owned())
            .and_then(|text| parse_text_value(&sse.resume, text.trim()))
            .map_err(|e| Failure::grpc(Code::InvalidArgument, format!("Last-Event-ID: {e}")))?;
        input.set_field(&sse.resume, value);
    }

    let grpc_request = grpc_request(route, &input, &parts.headers, parts.extensions)?;
    let Ok(response) = grpc.oneshot(grpc_request).await;
    let (head, grpc_body) = response.into_parts();

    // A trailers-only answer carries the status in the headers and no body.
    if let Some((code, message)) = status_from_headers(&head.headers) {
        if code != Code::Ok {
            return Err(Failure::grpc(code, message).with_retry_after(&head.headers));
        }
        if route.server_streaming {
            return Ok(sse_response(AxumBody::empty()));
        }
        return Err(Failure::internal("unary response without a message"));
    }
    if head.status != StatusCode::OK {
        return Err(Failure::internal(&format!(
            "gRPC service answered HTTP {}",
            head.status
        )));
    }

    if route.server_streaming {
        let stream = SseStream {
            body: grpc_body,
            buffer: BytesMut::new(),
            output: route.method.output(),
            response_body: route.response_body.clone(),
            sse: route.sse.clone(),
            done: false,
        };
        return Ok(sse_response(AxumBody::from_stream(stream.into_stream())));
    }
    unary_response(route, grpc_body).await
}

/// Reads the request body, refusing more than `max` bytes.
async fn read_body(headers: &HeaderMap, body: AxumBody, max: usize) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::ResourceExhausted,
            format!("request body is larger than {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(err) => Err(Failure::grpc(
            Code::InvalidArgument,
            format!("cannot read the request body: {err}"),
        )),
    }
}

/// Builds the in-process gRPC request for `input`.
fn grpc_request(
    route: &Route,
    input: &DynamicMessage,
    headers: &HeaderMap,
    extensions: http::Extensions,
) -> Result<http::Request<tonic::body::Body>, Failure> {
    let frame = grpc_frame(&input.encode_to_vec())
        .ok_or_else(|| Failure::internal("request message does not fit in a gRPC frame"))?;
    let mut request = http::Request::new(tonic::body::Body::new(Full::new(frame)));
    *request.method_mut() = Method::POST;
    *request.version_mut() = http::Version::HTTP_2;
    *request.uri_mut() = route
        .grpc_path
        .parse()
        .map_err(|_| Failure::internal("gRPC path is not a valid URI"))?;
    // Extensions carry what the connection knows (peer address, TLS info),
    // which the service may read as it would for a gRPC call.
    *request.extensions_mut() = extensions;
    let forwarded = request.headers_mut();
    *forwarded = forwarded_headers(headers);
    forwarded.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    forwarded.insert(header::TE, HeaderValue::from_static("trailers"));
    Ok(request)
}

/// The caller's headers that make sense as gRPC metadata: everything but
/// hop-by-hop headers, headers about the HTTP message itself, and the
/// `grpc-` and binary (`-bin`) names that a REST caller must not forge.
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    const DROPPED: [&str; 13] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "accept-encoding",
    ];
    // Headers named by `Connection` are hop-by-hop too (RFC 9110, 7.6.1).
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        let dropped = DROPPED.contains(&n)
            || listed.iter().any(|l| l == n)
            || n.starts_with("grpc-")
            || n.ends_with("-bin");
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Reads the single message of a unary answer and renders it as JSON.
async fn unary_response(route: &Route, body: tonic::body::Body) -> Result<Response, Failure> {
    let collected = body
        .collect()
        .await
        .map_err(|status| Failure::grpc(status.code(), status.message().to_owned()))?;
    let (code, message) = collected
        .trailers()
        .and_then(status_from_headers)
        .unwrap_or_else(missing_status);
    if code != Code::Ok {
        let failure = Failure::grpc(code, message);
        return Err(match collected.trailers() {
            Some(trailers) => failure.with_retry_after(trailers),
            None => failure,
        });
    }
    let mut buffer = BytesMut::from(collected.to_bytes());
    let encoded = match next_grpc_message(&mut buffer) {
        Ok(Some(encoded)) if buffer.is_empty() => encoded,
        Ok(_) => {
            return Err(Failure::internal(
                "unary response is not exactly one message",
            ));
        }
        Err(e) => return Err(Failure::internal(e)),
    };
    let json = render_message(
        &route.method.output(),
        route.response_body.as_ref(),
        encoded,
    )
    .map_err(|e| Failure::internal(&e))?;
    Ok(json_response(StatusCode::OK, json))
}

/// Decodes one response message and renders it as proto3 canonical JSON.
fn render_message(
    output: &MessageDescriptor,
    response_body: Option<&FieldDescriptor>,
    encoded: Bytes,
) -> Result<Vec<u8>, String> {
    let message = DynamicMessage::decode(output.clone(), encoded)
        .map_err(|e| format!("cannot decode the response message: {e}"))?;
    render_dynamic(&message, response_body)
}

fn render_dynamic(
    message: &DynamicMessage,
    response_body: Option<&FieldDescriptor>,
) -> Result<Vec<u8>, String> {
    let json = match response_body {
        None => serde_json::to_vec(message),
        Some(field) => serde_json::to_vec(&response_field_json(message, field)?),
    };
    json.map_err(|e| format!("cannot render the response as JSON: {e}"))
}

/// The JSON of one field of `message` (`response_body` in the rule). An
/// unset field renders as its default value rather than disappearing.
fn response_field_json(message: &DynamicMessage, field: &FieldDescriptor) -> Result<Json, String> {
    let mut only = DynamicMessage::new(message.descriptor());
    only.set_field(field, message.get_field(field).into_owned());
    let options = SerializeOptions::new().skip_default_fields(only.has_field(field));
    let serialized = only
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| e.to_string())?;
    Ok(serialized
        .get(field.json_name())
        .cloned()
        .unwrap_or(Json::Null))
}

/// Server-sent events from a gRPC response stream.
struct SseStream {
    body: tonic::body::Body,
    buffer: BytesMut,
    output: MessageDescriptor,
    response_body: Option<FieldDescriptor>,
    sse: Option<SseFields>,
    done: bool,
}

impl SseStream {
    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut state| async move {
            let event = state.next_event().await?;
            Some((Ok(event), state))
        })
    }

    /// The next SSE event, or `None` once the stream has ended.
    async fn next_event(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        loop {
            match next_grpc_message(&mut self.buffer) {
                Ok(Some(encoded)) => {
                    return match self.render(encoded) {
                        Ok(event) => Some(event),
                        Err(e) => Some(self.fail(Failure::internal(&e))),
                    };
                }
                Ok(None) => {}
                Err(e) => return Some(self.fail(Failure::internal(e))),
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buffer.extend_from_slice(&data),
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        let (code, message) =
                            status_from_headers(&trailers).unwrap_or_else(missing_status);
                        if code == Code::Ok && self.buffer.is_empty() {
                            self.done = true;
                            return None;
                        }
                        if code == Code::Ok {
                            return Some(
                                self.fail(Failure::internal("stream ended inside a message")),
                            );
                        }
                        return Some(self.fail(Failure::grpc(code, message)));
                    }
                },
                Some(Err(status)) => {
                    return Some(
                        self.fail(Failure::grpc(status.code(), status.message().to_owned())),
                    );
                }
                None => {
                    let (code, message) = missing_status();
                    return Some(self.fail(Failure::grpc(code, message)));
                }
            }
        }
    }

    /// One message as an SSE event: `data:` with the JSON, plus `id:` when
    /// the binding names one; or a comment line for a heartbeat.
    fn render(&self, encoded: Bytes) -> Result<Bytes, String> {
        let message = DynamicMessage::decode(self.output.clone(), encoded)
            .map_err(|e| format!("cannot decode the response message: {e}"))?;
        let json = render_dynamic(&message, self.response_body.as_ref())?;
        let Some(sse) = &self.sse else {
            return Ok(sse_data(None, &json));
        };
        if message.has_field(&sse.comment) {
            let mut comment = b": ".to_vec();
            comment.extend_from_slice(&json);
            comment.extend_from_slice(b"\n\n");
            return Ok(Bytes::from(comment));
        }
        Ok(sse_data(field_text(&message, &sse.id).as_deref(), &json))
    }

    /// Ends the stream with an `error` event.
    fn fail(&mut self, failure: Failure) -> Bytes {
        self.done = true;
        let mut event = b"event: error\ndata: ".to_vec();
        event.extend_from_slice(&failure.body());
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

/// The text of a scalar at a field path, when every message on the way is
/// set.
fn field_text(message: &DynamicMessage, path: &[FieldDescriptor]) -> Option<String> {
    let (leaf, parents) = path.split_last()?;
    let mut current = Cow::Borrowed(message);
    for parent in parents {
        if !current.has_field(parent) {
            return None;
        }
        let Value::Message(next) = current.get_field(parent).into_owned() else {
            return None;
        };
        current = Cow::Owned(next);
    }
    if !current.has_field(leaf) {
        return None;
    }
    match current.get_field(leaf).as_ref() {
        Value::I64(n) => Some(n.to_string()),
        Value::U64(n) => Some(n.to_string()),
        Value::I32(n) => Some(n.to_string()),
        Value::U32(n) => Some(n.to_string()),
        Value::String(s) if !s.contains(['\n', '\r']) => Some(s.clone()),
        _ => None,
    }
}

/// One SSE `data:` event, with its `id:` when it has one. Compact JSON
/// never contains a raw newline.
fn sse_data(id: Option<&str>, json: &[u8]) -> Bytes {
    let mut event = Vec::with_capacity(json.len() + 32);
    if let Some(id) = id {
        event.extend_from_slice(b"id: ");
        event.extend_from_slice(id.as_bytes());
        event.push(b'\n');
    }
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(json);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

fn sse_response(body: AxumBody) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn json_response(status: StatusCode, json: Vec<u8>) -> Response {
    let mut response = Response::new(AxumBody::from(json));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The 5-byte gRPC message prefix (not compressed, big-endian length) and
/// the message.
fn grpc_frame(message: &[u8]) -> Option<Bytes> {
    let len = u32::try_from(message.len()).ok()?;
    let mut frame = BytesMut::with_capacity(message.len() + 5);
    frame.put_u8(0);
    frame.put_u32(len);
    frame.put_slice(message);
    Some(frame.freeze())
}

/// Takes the next complete gRPC message off `buffer`, or `None` when the
/// buffer does not hold one yet.
fn next_grpc_message(buffer: &mut BytesMut) -> Result<Option<Bytes>, &'static str> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if buffer.len() < 5 + len {
        return Ok(None);
    }
    // The gateway never sends `grpc-accept-encoding`, so a compressed
    // message is a broken peer.
    if buffer[0] != 0 {
        return Err("compressed gRPC message without negotiation");
    }
    buffer.advance(5);
    Ok(Some(buffer.split_to(len).freeze()))
}

/// `grpc-status` and the percent-decoded `grpc-message`, when present.
fn status_from_headers(headers: &HeaderMap) -> Option<(Code, String)> {
    let code = Code::from_bytes(headers.get("grpc-status")?.as_bytes());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|v| percent_decode_str(v).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    Some((code, message))
}

fn missing_status() -> (Code, String) {
    (Code::Unknown, "gRPC response ended without a status".into())
}

/// An answer that is not the method's output: a gateway refusal or the
/// service's error status.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    code: Code,
    message: String,
    allow: Option<String>,
    /// From the service's `retry-after` metadata: the `Retry-After` header.
    retry_after: Option<HeaderValue>,
}

impl Failure {
    fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Failure {
            status,
            code,
            message: message.into(),
            allow: None,
            retry_after: None,
        }
    }

    /// An error whose HTTP status is the shared mapping of its gRPC code.
    fn grpc(code: Code, message: impl Into<String>) -> Self {
        Failure::new(http_status(code), code, message)
    }

    /// A fault of the gateway or of the service's answer: logged, and shown
    /// to the caller only as `internal error`.
    fn internal(cause: &str) -> Self {
        tracing::error!(cause, "REST gateway failure");
        Failure::grpc(Code::Internal, "internal error")
    }

    /// Keeps the service's retry hint (whole seconds) for the HTTP answer.
    fn with_retry_after(mut self, metadata: &HeaderMap) -> Self {
        self.retry_after = metadata
            .get(crate::error::RETRY_AFTER)
            .filter(|v| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit))
            .cloned();
        self
    }

    fn with_allow(mut self, allow: String) -> Self {
        self.allow = Some(allow);
        self
    }

    /// The JSON of a `google.rpc.Status`.
    fn body(&self) -> Vec<u8> {
        let status = serde_json::json!({
            "code": self.code as i32,
            "message": self.message,
            "details": [],
        });
        status.to_string().into_bytes()
    }

    fn into_response(self) -> Response {
        let mut response = json_response(self.status, self.body());
        if let Some(allow) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        if let Some(retry_after) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after);
        }
        response
    }
}

/// One HTTP binding of one method.
#[derive(Debug)]
struct Route {
    /// `None` for a custom pattern of kind `*`: any HTTP method.
    http_method: Option<Method>,
    template: PathTemplate,
    template_text: String,
    method: MethodDescriptor,
    /// `/package.Service/Method`.
    grpc_path: String,
    server_streaming: bool,
    /// The input fields bound by the template's variables, in order.
    path_fields: Vec<FieldPath>,
    body: BodyMapping,
    response_body: Option<FieldDescriptor>,
    /// Set by [`Gateway::with_sse`].
    sse: Option<SseFields>,
}

/// A resolved dotted field path, such as `webhook.url`.
#[derive(Debug, Clone)]
struct FieldPath {
    text: String,
    fields: Vec<FieldDescriptor>,
}

impl FieldPath {
    /// Whether one path is the other or a prefix of it: setting both would
    /// set one field twice.
    fn overlaps(&self, other: &[FieldDescriptor]) -> bool {
        self.fields
            .iter()
            .zip(other)
            .all(|(a, b)| a.full_name() == b.full_name())
    }
}

/// Where the JSON body goes (`body` in the rule).
#[derive(Debug, Clone)]
enum BodyMapping {
    /// No body is allowed.
    None,
    /// `*`: the body is the whole input message.
    Whole,
    /// The body is this top-level field of the input message.
    Field(FieldDescriptor),
}

/// One binding as read from an `HttpRule`, not yet compiled.
#[derive(Debug)]
struct RawBinding {
    http_method: Option<Method>,
    template: String,
    body: String,
    response_body: String,
}

/// Reads the pattern, body and additional bindings of an `HttpRule`.
fn read_http_rule(
    rule: &DynamicMessage,
    top_level: bool,
    out: &mut Vec<RawBinding>,
) -> Result<(), String> {
    let string = |name: &str| match rule.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let mut pattern = None;
    for (name, method) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(name) {
            pattern = Some((Some(method), string(name)));
        }
    }
    if rule.has_field_by_name("custom")
        && let Some(Value::Message(custom)) = rule.get_field_by_name("custom").as_deref()
    {
        let text = |name: &str| match custom.get_field_by_name(name).as_deref() {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let kind = text("kind");
        let method = if kind == "*" {
            None
        } else {
            Some(
                Method::from_bytes(kind.as_bytes())
                    .map_err(|_| format!("custom HTTP method `{kind}` is not a valid method"))?,
            )
        };
        pattern = Some((method, text("path")));
    }
    let (http_method, template) = pattern.ok_or("the HTTP rule has no pattern")?;
    out.push(RawBinding {
        http_method,
        template,
        body: string("body"),
        response_body: string("response_body"),
    });

    if let Some(Value::List(additional)) = rule.get_field_by_name("additional_bindings").as_deref()
    {
        if !top_level && !additional.is_empty() {
            return Err("additional bindings must not have additional bindings".into());
        }
        for binding in additional {
            if let Value::Message(binding) = binding {
                read_http_rule(binding, false, out)?;
            }
        }
    }
    Ok(())
}

impl Route {
    fn compile(
        service: &str,
        method: &MethodDescriptor,
        binding: RawBinding,
    ) -> Result<Route, GatewayError> {
        let method_name = method.full_name().to_owned();
        let binding_error = |message: String| GatewayError::Binding {
            method: method_name.clone(),
            message,
        };
        let template =
            PathTemplate::parse(&binding.template).map_err(|source| GatewayError::Template {
                method: method_name.clone(),
                template: binding.template.clone(),
                source,
            })?;
        let input = method.input();

        let mut path_fields = Vec::with_capacity(template.variables.len());
        for variable in &template.variables {
            let text = variable.field_path.join(".");
            let fields = resolve_field_path(&input, &variable.field_path, false)
                .map_err(|e| binding_error(format!("path variable `{text}`: {e}")))?;
            let leaf = fields.last().expect("a field path has at least one name");
            if leaf.is_list() || leaf.is_map() || matches!(leaf.kind(), Kind::Message(_)) {
                return Err(binding_error(format!(
                    "path variable `{text}` must name a singular scalar or enum field"
                )));
            }
            path_fields.push(FieldPath { text, fields });
        }

        let body = match binding.body.as_str() {
            "" => BodyMapping::None,
            "*" => BodyMapping::Whole,
            name => BodyMapping::Field(input.get_field_by_name(name).ok_or_else(|| {
                binding_error(format!("body field `{name}` is not a field of the input"))
            })?),
        };
        let response_body = match binding.response_body.as_str() {
            "" => None,
            name => Some(method.output().get_field_by_name(name).ok_or_else(|| {
                binding_error(format!(
                    "response_body field `{name}` is not a field of the output"
                ))
            })?),
        };

        Ok(Route {
            http_method: binding.http_method,
            template,
            template_text: binding.template,
            method: method.clone(),
            grpc_path: format!("/{service}/{}", method.name()),
            server_streaming: method.is_server_streaming(),
            path_fields,
            body,
            response_body,
            sse: None,
        })
    }

    fn accepts(&self, method: &Method) -> bool {
        self.http_method.as_ref().is_none_or(|m| m == method)
    }

    fn method_label(&self) -> &str {
        self.http_method.as_ref().map_or("*", Method::as_str)
    }

    /// Two bindings conflict when they have the same HTTP method (or one
    /// accepts any) and the same template shape.
    fn conflicts_with(&self, other: &Route) -> bool {
        let methods_overlap = match (&self.http_method, &other.http_method) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        methods_overlap
            && self.template.segments == other.template.segments
            && self.template.verb == other.template.verb
    }

    /// Builds the input message from the path captures, the query string and
    /// the body. The error is a caller-facing message that names the field.
    fn transcode(
        &self,
        captures: &[String],
        query: Option<&str>,
        body: &[u8],
    ) -> Result<DynamicMessage, String> {
        let input = self.method.input();
        let body_is_blank = body.iter().all(u8::is_ascii_whitespace);
        let mut message = match &self.body {
            BodyMapping::None if !body_is_blank => {
                return Err("request body: this method takes no request body".into());
            }
            BodyMapping::None => DynamicMessage::new(input.clone()),
            BodyMapping::Whole => message_from_json(&input, &parse_json(body)?)?,
            BodyMapping::Field(_) if body_is_blank => DynamicMessage::new(input.clone()),
            BodyMapping::Field(field) => {
                let mut wrapper = serde_json::Map::new();
                wrapper.insert(field.json_name().to_owned(), parse_json(body)?);
                message_from_json(&input, &Json::Object(wrapper))?
            }
        };

        for (index, (path, raw)) in self.path_fields.iter().zip(captures).enumerate() {
            let multi_segment = self.template.variables[index].is_multi_segment(&self.template);
            let decoded = decode_path_value(raw, multi_segment)
                .ok_or_else(|| format!("{}: is not valid UTF-8 once decoded", path.text))?;
            let leaf = path
                .fields
                .last()
                .expect("a field path has at least one name");
            let value =
                parse_text_value(leaf, &decoded).map_err(|e| format!("{}: {e}", path.text))?;
            set_field_path(&mut message, &path.fields, value)
                .map_err(|e| format!("{}: {e}", path.text))?;
        }

        if let Some(query) = query {
            self.apply_query(&mut message, query)?;
        }
        Ok(message)
    }

    /// Sets the fields named by URL query parameters.
    fn apply_query(&self, message: &mut DynamicMessage, query: &str) -> Result<(), String> {
        let input = self.method.input();
        let mut seen = HashSet::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode_query_component(raw_key)
                .ok_or("query parameter name is not valid UTF-8 once decoded")?;
            let value = decode_query_component(raw_value)
                .ok_or_else(|| format!("{key}: is not valid UTF-8 once decoded"))?;
            if matches!(self.body, BodyMapping::Whole) {
                return Err(format!(
                    "{key}: query parameters are not accepted; this method reads its fields \
                     from the request body"
                ));
            }
            let names: Vec<String> = key.split('.').map(str::to_owned).collect();
            let fields = resolve_field_path(&input, &names, true)
                .map_err(|e| format!("{key}: unknown query parameter ({e})"))?;
            if self.path_fields.iter().any(|p| p.overlaps(&fields)) {
                return Err(format!("{key}: is bound by the URL path"));
            }
            if let BodyMapping::Field(body_field) = &self.body
                && fields[0].full_name() == body_field.full_name()
            {
                return Err(format!("{key}: is carried in the request body"));
            }
            let leaf = fields.last().expect("a field path has at least one name");
            if leaf.is_map() {
                return Err(format!("{key}: a map cannot be set from a query parameter"));
            }
            let canonical: Vec<&str> = fields.iter().map(FieldDescriptor::name).collect();
            if !seen.insert(canonical.join(".")) && !leaf.is_list() {
                return Err(format!("{key}: is given more than once"));
            }
            let parsed = parse_text_value(leaf, &value).map_err(|e| format!("{key}: {e}"))?;
            set_field_path(message, &fields, parsed).map_err(|e| format!("{key}: {e}"))?;
        }
        Ok(())
    }
}

/// Resolves a dotted field path in `message`. Every name but the last must
/// be a singular message field. `json_names` also accepts lowerCamelCase
/// names (query parameters); templates use proto names only.
fn resolve_field_path(
    message: &MessageDescriptor,
    names: &[String],
    json_names: bool,
) -> Result<Vec<FieldDescriptor>, String> {
    let mut current = message.clone();
    let mut fields = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let field = current
            .get_field_by_name(name)
            .or_else(|| {
                json_names
                    .then(|| current.get_field_by_json_name(name))
                    .flatten()
            })
            .ok_or_else(|| format!("`{name}` is not a field of {}", current.full_name()))?;
        if i + 1 < names.len() {
            match field.kind() {
                Kind::Message(next)
                    if !field.is_list() && !field.is_map() && !is_well_known(&next) =>
                {
                    current = next;
                }
                _ => return Err(format!("`{name}` is not a singular message field")),
            }
        }
        fields.push(field);
    }
    if fields.is_empty() {
        return Err("empty field path".into());
    }
    Ok(fields)
}

fn is_well_known(message: &MessageDescriptor) -> bool {
    message.full_name().starts_with("google.protobuf.")
}

/// Sets (or, for a repeated field, appends) the value at a field path,
/// creating the intermediate messages.
fn set_field_path(
    message: &mut DynamicMessage,
    fields: &[FieldDescriptor],
    value: Value,
) -> Result<(), String> {
    let (leaf, parents) = fields.split_last().ok_or("empty field path")?;
    let mut current = message;
    for parent in parents {
        current = match current.get_field_mut(parent) {
            Value::Message(next) => next,
            _ => return Err("is not inside a message field".into()),
        };
    }
    if leaf.is_list() {
        match current.get_field_mut(leaf) {
            Value::List(list) => list.push(value),
            _ => return Err("is not a repeated field".into()),
        }
        Ok(())
    } else {
        current
            .try_set_field(leaf, value)
            .map_err(|_| "has a value of the wrong type".to_owned())
    }
}

/// Parses a path or query text for a field of the given kind (the element
/// kind for a repeated field).
fn parse_text_value(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    fn number<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, String> {
        text.trim()
            .parse()
            .map_err(|_| format!("`{text}` is not {what}"))
    }
    fn float(text: &str) -> Result<f64, String> {
        match text.trim() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            other => number(other, "a number"),
        }
    }
    Ok(match field.kind() {
        Kind::String => Value::String(text.to_owned()),
        Kind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(format!("`{text}` is not `true` or `false`")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(number(text, "a 32-bit integer")?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(number(text, "a 64-bit integer")?)
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(number(text, "an unsigned 32-bit integer")?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(number(text, "an unsigned 64-bit integer")?),
        Kind::Float => Value::F32(float(text)? as f32),
        Kind::Double => Value::F64(float(text)?),
        Kind::Bytes => {
            use base64::Engine as _;
            let engines = [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE,
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ];
            let bytes = engines
                .iter()
                .find_map(|engine| engine.decode(text).ok())
                .ok_or_else(|| format!("`{text}` is not base64"))?;
            Value::Bytes(Bytes::from(bytes))
        }
        Kind::Enum(enumeration) => {
            let value = enumeration.get_value_by_name(text).or_else(|| {
                text.parse::<i32>()
                    .ok()
                    .and_then(|n| enumeration.get_value(n))
            });
            match value {
                Some(value) => Value::EnumNumber(value.number()),
                None => return Err(format!("`{text}` is not a value of {}", enumeration.name())),
            }
        }
        Kind::Message(message) => Value::Message(parse_well_known_text(&message, text)?),
    })
}

/// Parses the text form of the well-known types that fit in one query
/// parameter: timestamps, durations, field masks and wrappers.
fn parse_well_known_text(
    message: &MessageDescriptor,
    text: &str,
) -> Result<DynamicMessage, String> {
    let json = match message.full_name() {
        "google.protobuf.BoolValue" => match text {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => return Err(format!("`{text}` is not `true` or `false`")),
        },
        "google.protobuf.Timestamp"
        | "google.protobuf.Duration"
        | "google.protobuf.FieldMask"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue"
        | "google.protobuf.Int32Value"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.FloatValue"
        | "google.protobuf.DoubleValue" => Json::String(text.to_owned()),
        name => return Err(format!("a {name} cannot be set from text")),
    };
    DynamicMessage::deserialize(message.clone(), &json).map_err(|e| format!("`{text}`: {e}"))
}

/// Percent-decodes a path capture. A multi-segment capture keeps `%2F` as
/// it is, so that an encoded slash stays distinguishable from a separator.
fn decode_path_value(raw: &str, multi_segment: bool) -> Option<String> {
    if !multi_segment {
        return percent_decode_str(raw)
            .decode_utf8()
            .ok()
            .map(Cow::into_owned);
    }
    let normalized = raw.replace("%2f", "%2F");
    let parts: Option<Vec<String>> = normalized
        .split("%2F")
        .map(|part| {
            percent_decode_str(part)
                .decode_utf8()
                .ok()
                .map(Cow::into_owned)
        })
        .collect();
    Some(parts?.join("%2F"))
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn decode_query_component(raw: &str) -> Option<String> {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}

fn parse_json(body: &[u8]) -> Result<Json, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Json::Object(serde_json::Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| format!("request body: invalid JSON: {e}"))
}

/// Reads a message from JSON with unknown fields denied. On failure the
/// message names the offending field path, found by [`locate_json_error`].
fn message_from_json(desc: &MessageDescriptor, json: &Json) -> Result<DynamicMessage, String> {
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(desc.clone(), json, &options).map_err(|err| {
        locate_json_error(desc, json, "").unwrap_or_else(|| format!("request body: {err}"))
    })
}

/// Finds the field whose JSON value does not deserialize: prost-reflect's
/// errors say what is wrong but not where. This runs on the error path
/// only, trying one field at a time and descending into nested messages.
fn locate_json_error(desc: &MessageDescriptor, json: &Json, prefix: &str) -> Option<String> {
    let here = if prefix.is_empty() {
        "request body"
    } else {
        prefix
    };
    let Json::Object(object) = json else {
        return Some(format!("{here}: must be a JSON object"));
    };
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    for (key, value) in object {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let Some(field) = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key))
        else {
            return Some(format!("{path}: unknown field"));
        };
        let single = Json::Object(serde_json::Map::from_iter([(key.clone(), value.clone())]));
        let Err(err) = DynamicMessage::deserialize_with_options(desc.clone(), &single, &options)
        else {
            continue;
        };
        let nested = match (field.kind(), value) {
            (Kind::Message(inner), _) if is_well_known(&inner) => None,
            (Kind::Message(inner), Json::Object(entries)) if field.is_map() => {
                let value_field = inner.map_entry_value_field();
                match value_field.kind() {
                    Kind::Message(value_desc) if !is_well_known(&value_desc) => {
                        entries.iter().find_map(|(k, v)| {
                            locate_json_error(&value_desc, v, &format!("{path}.{k}"))
                        })
                    }
                    _ => None,
                }
            }
            (Kind::Message(inner), Json::Array(items)) if field.is_list() => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| locate_json_error(&inner, item, &format!("{path}[{i}]"))),
            (Kind::Message(inner), Json::Object(_)) if !field.is_list() => {
                locate_json_error(&inner, value, &path)
            }
            _ => None,
        };
        return Some(nested.unwrap_or_else(|| format!("{path}: {err}")));
    }
    None
}

/// A compiled path template (`google/api/http.proto`):
///
/// ```text
/// Template = "/" Segments [ Verb ] ;
/// Segments = Segment { "/" Segment } ;
/// Segment  = "*" | "**" | LITERAL | Variable ;
/// Variable = "{" FieldPath [ "=" Segments ] "}" ;
/// FieldPath = IDENT { "." IDENT } ;
/// Verb     = ":" LITERAL ;
/// ```
///
/// Variables are flattened into the segment list: a variable records which
/// segments it spans, so matching is one pass over the request's segments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PathTemplate {
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one non-empty segment.
    Single,
    /// `**`: zero or more segments; only ever the last segment.
    Multi,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Variable {
    field_path: Vec<String>,
    /// The segments it spans: `segments[start..end]`.
    start: usize,
    end: usize,
}

impl Variable {
    /// Whether the variable may capture a `/` (its decoding keeps `%2F`).
    fn is_multi_segment(&self, template: &PathTemplate) -> bool {
        self.end - self.start > 1
            || template.segments[self.start..self.end].contains(&Segment::Multi)
    }
}

impl PathTemplate {
    fn parse(text: &str) -> Result<PathTemplate, TemplateError> {
        let err = |message: &str| Err(TemplateError(message.to_owned()));
        let Some(rest) = text.strip_prefix('/') else {
            return err("must start with `/`");
        };
        let mut segments = Vec::new();
        let mut variables: Vec<Variable> = Vec::new();
        let mut verb = None;
        let mut pos = 0;
        loop {
            let tail = &rest[pos..];
            if let Some(after_brace) = tail.strip_prefix('{') {
                let Some(close) = after_brace.find('}') else {
                    return err("`{` is not closed");
                };
                let inner = &after_brace[..close];
                if inner.contains('{') {
                    return err("variables cannot be nested");
                }
                let (path, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
                let field_path = parse_field_path(path)?;
                if variables.iter().any(|v| v.field_path == field_path) {
                    return err(&format!("variable `{path}` appears twice"));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments.push(parse_plain_segment(part)?);
                }
                variables.push(Variable {
                    field_path,
                    start,
                    end: segments.len(),
                });
                pos += close + 2;
            } else {
                let end = tail.find(['/', ':']).unwrap_or(tail.len());
                segments.push(parse_plain_segment(&tail[..end])?);
                pos += end;
            }
            match rest[pos..].chars().next() {
                None => break,
                Some('/') => pos += 1,
                Some(':') => {
                    let literal = &rest[pos + 1..];
                    if literal.is_empty() || !literal.chars().all(is_literal_char) {
                        return err(&format!("`{literal}` is not a valid verb"));
                    }
                    verb = Some(literal.to_owned());
                    break;
                }
                Some(c) => return err(&format!("unexpected `{c}`")),
            }
        }
        if let Some(i) = segments.iter().position(|s| *s == Segment::Multi)
            && i + 1 != segments.len()
        {
            return err("`**` must be the last segment");
        }
        Ok(PathTemplate {
            segments,
            variables,
            verb,
        })
    }

    /// Matches a raw (percent-encoded) request path. Returns the raw text
    /// captured by each variable, in order.
    fn match_path(&self, path: &str) -> Option<Vec<String>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(verb) => rest.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => rest,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let multi = self.segments.last() == Some(&Segment::Multi);
        let fixed = self.segments.len() - usize::from(multi);
        let tail: &[&str] = if multi {
            if parts.len() < fixed {
                return None;
            }
            match &parts[fixed..] {
                // `/**` against `/`: zero segments, not one empty one.
                [""] if fixed == 0 => &[],
                tail if tail.iter().any(|p| p.is_empty()) => return None,
                tail => tail,
            }
        } else {
            if parts.len() != fixed {
                return None;
            }
            &[]
        };
        for (segment, part) in self.segments[..fixed].iter().zip(&parts) {
            let ok = match segment {
                Segment::Literal(literal) => literal == part,
                Segment::Single => !part.is_empty(),
                Segment::Multi => false,
            };
            if !ok {
                return None;
            }
        }
        let matched = fixed + tail.len();
        let captures = self
            .variables
            .iter()
            .map(|v| {
                let end = if multi && v.end == self.segments.len() {
                    matched
                } else {
                    v.end
                };
                let pieces: Vec<&str> = (v.start..end)
                    .map(|i| if i < fixed { parts[i] } else { tail[i - fixed] })
                    .collect();
                pieces.join("/")
            })
            .collect();
        Some(captures)
    }

    /// Orders templates that match the same path: a custom verb, then more
    /// literal segments, then no `**`.
    fn specificity(&self) -> (bool, usize, bool) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        (
            self.verb.is_some(),
            literals,
            !self.segments.contains(&Segment::Multi),
        )
    }
}

fn parse_plain_segment(text: &str) -> Result<Segment, TemplateError> {
    match text {
        "" => Err(TemplateError("empty segment".into())),
        "*" => Ok(Segment::Single),
        "**" => Ok(Segment::Multi),
        literal if literal.chars().all(is_literal_char) => Ok(Segment::Literal(literal.into())),
        other => Err(TemplateError(format!("`{other}` is not a valid segment"))),
    }
}

/// Characters of a literal: unreserved, sub-delims without the grammar's own
/// `*` and `=`, `@`, and `%` for percent-encoded octets.
fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()+,;@%".contains(c)
}

fn parse_field_path(text: &str) -> Result<Vec<String>, TemplateError> {
    let names: Vec<String> = text.split('.').map(str::to_owned).collect();
    let valid = |name: &String| {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if names.iter().all(valid) {
        Ok(names)
    } else {
        Err(TemplateError(format!("`{text}` is not a field path")))
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use futures_util::{Stream, StreamExt as _};
    use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

    use http::HeaderName;

    use super::*;
    use crate::proto::{
        self, Attempt, CancelWebhookRequest, CancelWebhookResponse, ConfirmRequest,
        ConfirmResponse, CreateUploadWebhookRequest, CreateUploadWebhookResponse, GetStatusRequest,
        GetStatusResponse, ListWebhooksRequest, ListWebhooksResponse, RedeliverRequest,
        RedeliverResponse, StreamEventsRequest, StreamEventsResponse, Webhook, WebhookEvent,
        webhook_service_server::{WebhookService, WebhookServiceServer},
    };

    fn template(text: &str) -> PathTemplate {
        PathTemplate::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn captures(text: &str, path: &str) -> Option<Vec<String>> {
        template(text).match_path(path)
    }

    #[test]
    fn parses_literals_variables_and_verb() {
        let t = template("/v1/webhooks/{webhook_id}:confirm");
        assert_eq!(
            t.segments,
            vec![
                Segment::Literal("v1".into()),
                Segment::Literal("webhooks".into()),
                Segment::Single
            ]
        );
        assert_eq!(t.verb.as_deref(), Some("confirm"));
        assert_eq!(t.variables.len(), 1);
        assert_eq!(t.variables[0].field_path, vec!["webhook_id"]);
        assert_eq!((t.variables[0].start, t.variables[0].end), (2, 3));
    }

    #[test]
    fn parses_multi_segment_and_nested_field_paths() {
        let t = template("/v1/{name=shelves/*/books/*}/x/{rest.path=**}");
        assert_eq!(t.variables[0].field_path, vec!["name"]);
        assert_eq!((t.variables[0].start, t.variables[0].end), (1, 5));
        assert_eq!(t.variables[1].field_path, vec!["rest", "path"]);
        assert_eq!(t.segments.last(), Some(&Segment::Multi));
        assert!(t.variables[0].is_multi_segment(&t));
        assert!(t.variables[1].is_multi_segment(&t));
        assert_eq!(
            template("/v1/events:stream").verb.as_deref(),
            Some("stream")
        );
    }

    #[test]
    fn rejects_malformed_templates() {
        for bad in [
            "v1/webhooks",
            "/",
            "/v1//x",
            "/v1/{id",
            "/v1/{a={b}}",
            "/v1/**/x",
            "/v1/{x=**}/y",
            "/v1/{1abc}",
            "/v1/{a..b}",
            "/v1/{id}/{id}",
            "/v1/x:",
            "/v1/x:a/b",
            "/v1/a*b",
            "/v1/{id}x",
        ] {
            assert!(
                PathTemplate::parse(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn matches_literals_variables_and_verbs() {
        assert_eq!(
            captures(
                "/v1/webhooks/{webhook_id}:confirm",
                "/v1/webhooks/wh_1:confirm"
            ),
            Some(vec!["wh_1".to_owned()])
        );
        assert_eq!(
            captures(
                "/v1/webhooks/{webhook_id}:confirm",
                "/v1/webhooks/wh_1:cancel"
            ),
            None
        );
        assert_eq!(
            captures("/v1/webhooks/{webhook_id}:confirm", "/v1/webhooks/wh_1"),
            None
        );
        // Without a verb in the template, a colon is part of the segment.
        assert_eq!(
            captures("/v1/webhooks/{webhook_id}", "/v1/webhooks/a:b"),
            Some(vec!["a:b".to_owned()])
        );
        assert_eq!(captures("/v1/webhooks", "/v1/webhooks"), Some(vec![]));
        assert_eq!(captures("/v1/webhooks", "/v1/webhooks/"), None);
        assert_eq!(captures("/v1/webhooks/{id}", "/v1/webhooks/"), None);
        assert_eq!(captures("/v1/webhooks/{id}", "/v1/webhooks/a/b"), None);
        assert_eq!(
            captures("/v1/events:stream", "/v1/events:stream"),
            Some(vec![])
        );
    }

    #[test]
    fn matches_multi_segment_variables() {
        let t = "/v1/{name=shelves/*/books/*}";
        assert_eq!(
            captures(t, "/v1/shelves/s1/books/b%2F2"),
            Some(vec!["shelves/s1/books/b%2F2".to_owned()])
        );
        assert_eq!(captures(t, "/v1/shelves/s1/cds/b2"), None);
        let t = "/files/{path=**}:get";
        assert_eq!(
            captures(t, "/files/a/b/c:get"),
            Some(vec!["a/b/c".to_owned()])
        );
        assert_eq!(captures(t, "/files:get"), Some(vec![String::new()]));
        assert_eq!(captures("/{path=**}", "/"), Some(vec![String::new()]));
        assert_eq!(captures(t, "/files/a//c:get"), None);
    }

    #[test]
    fn decodes_path_captures() {
        assert_eq!(
            decode_path_value("a%20b%2Fc", false).as_deref(),
            Some("a b/c")
        );
        assert_eq!(
            decode_path_value("a%20b/c%2fd%2Fe", true).as_deref(),
            Some("a b/c%2Fd%2Fe")
        );
        assert_eq!(decode_path_value("%FF", false), None);
    }

    #[test]
    fn frames_round_trip() {
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&grpc_frame(b"hello").unwrap());
        buffer.extend_from_slice(&grpc_frame(b"").unwrap());
        buffer.extend_from_slice(&grpc_frame(b"xy").unwrap()[..4]);
        assert_eq!(next_grpc_message(&mut buffer).unwrap().unwrap(), "hello");
        assert_eq!(next_grpc_message(&mut buffer).unwrap().unwrap(), "");
        assert_eq!(next_grpc_message(&mut buffer).unwrap(), None);
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert!(next_grpc_message(&mut compressed).is_err());
    }

    #[test]
    fn forwards_metadata_headers_only() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer k"),
            ("x-request-id", "r1"),
            ("host", "example.com"),
            ("content-type", "application/json"),
            ("content-length", "2"),
            ("accept-encoding", "gzip"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("grpc-status", "0"),
            ("x-trace-bin", "AAA="),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let forwarded = forwarded_headers(&headers);
        let mut names: Vec<&str> = forwarded.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["authorization", "x-request-id"]);
    }

    fn gateway() -> Gateway {
        Gateway::from_descriptors(proto::FILE_DESCRIPTOR_SET, proto::SERVICE_NAME)
            .expect("the service's annotations compile")
    }

    fn route<'a>(gateway: &'a Gateway, method: &str) -> &'a Route {
        gateway
            .routes
            .iter()
            .find(|r| r.method.name() == method)
            .unwrap_or_else(|| panic!("no route for {method}"))
    }

    #[test]
    fn builds_a_route_for_every_annotated_method() {
        let gateway = gateway();
        let mut routes: Vec<String> = gateway
            .routes
            .iter()
            .map(|r| format!("{} {} {}", r.method_label(), r.template_text, r.grpc_path))
            .collect();
        routes.sort();
        assert_eq!(
            routes,
            vec![
                "GET /v1/events:stream /uploadhook.v1.WebhookService/StreamEvents",
                "GET /v1/webhooks /uploadhook.v1.WebhookService/ListWebhooks",
                "GET /v1/webhooks/{webhook_id} /uploadhook.v1.WebhookService/GetStatus",
                "POST /v1/webhooks /uploadhook.v1.WebhookService/CreateUploadWebhook",
                "POST /v1/webhooks/{webhook_id}:cancel /uploadhook.v1.WebhookService/CancelWebhook",
                "POST /v1/webhooks/{webhook_id}:confirm /uploadhook.v1.WebhookService/Confirm",
                "POST /v1/webhooks/{webhook_id}:redeliver /uploadhook.v1.WebhookService/Redeliver",
                "POST /v1/webhooks/{webhook_id}:rotateSecret /uploadhook.v1.WebhookService/RotateSecret",
            ]
        );
        assert!(route(&gateway, "StreamEvents").server_streaming);
    }

    #[test]
    fn rejects_unknown_service() {
        let err =
            Gateway::from_descriptors(proto::FILE_DESCRIPTOR_SET, "nope.Service").unwrap_err();
        assert!(matches!(err, GatewayError::ServiceNotFound(_)), "{err}");
    }

    /// The uploadhook contract has no custom pattern, additional binding,
    /// field body, nested path variable or `response_body`, so this adds a
    /// small service that has them to the real descriptor set (which brings
    /// `google.api.http` and `descriptor.proto`).
    fn shelf_gateway() -> Gateway {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        let field = |name: &str, json: &str, number: u32, kind: &str| {
            serde_json::json!({"name": name, "jsonName": json, "number": number,
                               "label": "LABEL_OPTIONAL", "type": kind})
        };
        let mut books = field("books", "books", 1, "TYPE_MESSAGE");
        books["label"] = "LABEL_REPEATED".into();
        books["typeName"] = ".test.v1.Book".into();
        let mut book = field("book", "book", 1, "TYPE_MESSAGE");
        book["typeName"] = ".test.v1.Book".into();
        let file = serde_json::json!({
            "name": "test/v1/shelf.proto",
            "package": "test.v1",
            "dependency": ["google/api/annotations.proto"],
            "syntax": "proto3",
            "messageType": [
                {"name": "Book", "field": [
                    field("name", "name", 1, "TYPE_STRING"),
                    field("title", "title", 2, "TYPE_STRING"),
                    field("page_count", "pageCount", 3, "TYPE_INT64"),
                ]},
                {"name": "GetBookRequest", "field": [field("name", "name", 1, "TYPE_STRING")]},
                {"name": "UpdateBookRequest", "field": [
                    book,
                    field("validate_only", "validateOnly", 2, "TYPE_BOOL"),
                ]},
                {"name": "ListBooksResponse", "field": [books]},
            ],
            "service": [{"name": "Shelf", "method": [
                {"name": "GetBook", "inputType": ".test.v1.GetBookRequest",
                 "outputType": ".test.v1.Book",
                 "options": {"[google.api.http]": {
                     "get": "/v1/{name=shelves/*/books/*}",
                     "additionalBindings": [
                         {"custom": {"kind": "HEAD", "path": "/v1/{name=shelves/*/books/*}"}},
                         {"post": "/v1/{name=shelves/*/books/*}:fetch", "body": "*"},
                     ],
                 }}},
                {"name": "UpdateBook", "inputType": ".test.v1.UpdateBookRequest",
                 "outputType": ".test.v1.Book",
                 "options": {"[google.api.http]": {
                     "patch": "/v1/{book.name=shelves/*/books/*}", "body": "book",
                 }}},
                {"name": "ListBooks", "inputType": ".test.v1.GetBookRequest",
                 "outputType": ".test.v1.ListBooksResponse",
                 "options": {"[google.api.http]": {
                     "get": "/v1/{name=shelves/*}/books", "responseBody": "books",
                 }}},
            ]}],
        });
        let file_desc = pool
            .get_message_by_name("google.protobuf.FileDescriptorProto")
            .unwrap();
        let file = DynamicMessage::deserialize(file_desc, &file).unwrap();
        let set_desc = pool
            .get_message_by_name("google.protobuf.FileDescriptorSet")
            .unwrap();
        let mut set = DynamicMessage::decode(set_desc, proto::FILE_DESCRIPTOR_SET).unwrap();
        match set.get_field_by_name_mut("file") {
            Some(Value::List(files)) => files.push(Value::Message(file)),
            other => panic!("unexpected `file` field: {other:?}"),
        }
        Gateway::from_descriptors(&set.encode_to_vec(), "test.v1.Shelf").unwrap()
    }

    fn shelf_route<'a>(gateway: &'a Gateway, method: &str) -> &'a Route {
        gateway
            .routes
            .iter()
            .find(|r| r.method.name() == method)
            .unwrap()
    }

    #[test]
    fn compiles_additional_bindings_custom_methods_and_field_bodies() {
        let gateway = shelf_gateway();
        let found = |method: &str, path: &str| {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            match gateway.lookup(&method, path) {
                Lookup::Found(route, captures) => format!("{} {captures:?}", route.method.name()),
                Lookup::MethodNotAllowed(allow) => format!("405 {allow}"),
                Lookup::NotFound => "404".to_owned(),
            }
        };
        let book = r#"["shelves/s1/books/b1"]"#;
        assert_eq!(
            found("GET", "/v1/shelves/s1/books/b1"),
            format!("GetBook {book}")
        );
        assert_eq!(
            found("HEAD", "/v1/shelves/s1/books/b1"),
            format!("GetBook {book}")
        );
        assert_eq!(
            found("POST", "/v1/shelves/s1/books/b1:fetch"),
            format!("GetBook {book}")
        );
        assert_eq!(
            found("PATCH", "/v1/shelves/s1/books/b1"),
            format!("UpdateBook {book}")
        );
        assert_eq!(
            found("PUT", "/v1/shelves/s1/books/b1"),
            "405 GET, HEAD, PATCH"
        );
        assert_eq!(
            found("GET", "/v1/shelves/s1/books"),
            r#"ListBooks ["shelves/s1"]"#
        );
        assert_eq!(found("GET", "/v1/shelves/s1/cds/b1"), "404");

        // A multi-segment variable keeps an encoded slash encoded.
        let message = shelf_route(&gateway, "GetBook")
            .transcode(&["shelves/s%201/books/b%2F1".to_owned()], None, b"")
            .unwrap();
        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            serde_json::json!({"name": "shelves/s 1/books/b%2F1"})
        );

        // `body: "book"`: the body is the book, the path sets its name (and
        // wins over the body), and query parameters set the other fields.
        let update = shelf_route(&gateway, "UpdateBook");
        let captures = ["shelves/s1/books/b1".to_owned()];
        let message = update
            .transcode(
                &captures,
                Some("validateOnly=true"),
                br#"{"title": "T", "page_count": 3, "name": "ignored"}"#,
            )
            .unwrap();
        assert_eq!(
            serde_json::to_value(&message).unwrap(),
            serde_json::json!({
                "book": {"name": "shelves/s1/books/b1", "title": "T", "pageCount": "3"},
                "validateOnly": true,
            })
        );
        let err = update
            .transcode(&captures, Some("book.title=x"), b"{}")
            .unwrap_err();
        assert_eq!(err, "book.title: is carried in the request body");
        let err = update
            .transcode(&captures, None, br#"{"titel": "T"}"#)
            .unwrap_err();
        assert_eq!(err, "book.titel: unknown field");
    }

    #[test]
    fn response_body_renders_one_field() {
        let gateway = shelf_gateway();
        let list = shelf_route(&gateway, "ListBooks");
        let output = list.method.output();
        let field = list.response_body.as_ref().unwrap();
        let render = |message: &DynamicMessage| {
            let encoded = Bytes::from(message.encode_to_vec());
            String::from_utf8(render_message(&output, Some(field), encoded).unwrap()).unwrap()
        };
        let mut response = DynamicMessage::new(output.clone());
        assert_eq!(render(&response), "[]");
        let Kind::Message(book_desc) = field.kind() else {
            panic!("books is a message field");
        };
        let mut book = DynamicMessage::new(book_desc);
        book.set_field_by_name("page_count", Value::I64(7));
        response.set_field(field, Value::List(vec![Value::Message(book)]));
        assert_eq!(render(&response), r#"[{"pageCount":"7"}]"#);
    }

    #[test]
    fn looks_up_routes_by_method_and_path() {
        let gateway = gateway();
        let found = |method: Method, path: &str| match gateway.lookup(&method, path) {
            Lookup::Found(route, captures) => format!("{} {captures:?}", route.method.name()),
            Lookup::MethodNotAllowed(allow) => format!("405 {allow}"),
            Lookup::NotFound => "404".to_owned(),
        };
        assert_eq!(
            found(Method::POST, "/v1/webhooks/wh_1:confirm"),
            r#"Confirm ["wh_1"]"#
        );
        assert_eq!(
            found(Method::GET, "/v1/webhooks/wh_1"),
            r#"GetStatus ["wh_1"]"#
        );
        assert_eq!(found(Method::GET, "/v1/webhooks"), "ListWebhooks []");
        assert_eq!(
            found(Method::POST, "/v1/webhooks"),
            "CreateUploadWebhook []"
        );
        assert_eq!(found(Method::GET, "/v1/events:stream"), "StreamEvents []");
        assert_eq!(found(Method::DELETE, "/v1/webhooks"), "405 GET, POST");
        assert_eq!(
            found(Method::GET, "/v1/webhooks/wh_1:cancel"),
            r#"GetStatus ["wh_1:cancel"]"#
        );
        assert_eq!(
            found(Method::PUT, "/v1/webhooks/wh_1:cancel"),
            "405 GET, POST"
        );
        assert_eq!(found(Method::GET, "/v2/webhooks"), "404");
    }

    fn transcode(method: &str, captures: &[&str], query: Option<&str>, body: &str) -> Json {
        let gateway = gateway();
        let captures: Vec<String> = captures.iter().map(|c| (*c).to_owned()).collect();
        let message = route(&gateway, method)
            .transcode(&captures, query, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        serde_json::to_value(&message).unwrap()
    }

    fn transcode_err(method: &str, captures: &[&str], query: Option<&str>, body: &str) -> String {
        let gateway = gateway();
        let captures: Vec<String> = captures.iter().map(|c| (*c).to_owned()).collect();
        route(&gateway, method)
            .transcode(&captures, query, body.as_bytes())
            .expect_err("transcoding should fail")
    }

    #[test]
    fn transcodes_whole_body_with_both_name_styles() {
        let json = transcode(
            "CreateUploadWebhook",
            &[],
            None,
            r#"{"filename": "a.png", "content_type": "image/png", "contentLength": "42",
                "webhook": {"url": "https://r.test/h", "trigger": "TRIGGER_AUTO",
                            "metadata": {"k": "v"}},
                "expiresIn": "3600s"}"#,
        );
        assert_eq!(
            json,
            serde_json::json!({
                "filename": "a.png",
                "contentType": "image/png",
                "contentLength": "42",
                "webhook": {"url": "https://r.test/h", "trigger": "TRIGGER_AUTO",
                            "metadata": {"k": "v"}},
                "expiresIn": "3600s",
            })
        );
        assert_eq!(
            transcode("CancelWebhook", &["wh_1"], None, ""),
            serde_json::json!({"webhookId": "wh_1"})
        );
    }

    #[test]
    fn path_variables_win_over_the_body() {
        let json = transcode(
            "Confirm",
            &["wh_a%20b"],
            None,
            r#"{"etag": "\"e1\"", "webhookId": "wh_other"}"#,
        );
        assert_eq!(
            json,
            serde_json::json!({"webhookId": "wh_a b", "etag": "\"e1\""})
        );
    }

    #[test]
    fn transcodes_query_parameters() {
        let json = transcode(
            "ListWebhooks",
            &[],
            Some("pageSize=10&page_token=a%2Bb+c&status=STATUS_FAILED"),
            "",
        );
        assert_eq!(
            json,
            serde_json::json!({"pageSize": 10, "pageToken": "a+b c", "status": "STATUS_FAILED"})
        );
        let json = transcode(
            "StreamEvents",
            &[],
            Some(
                "webhookId=wh_1&after_event_id=5&types=a&types=b&statuses=9&statuses=STATUS_FAILED",
            ),
            "",
        );
        assert_eq!(
            json,
            serde_json::json!({
                "webhookId": "wh_1",
                "afterEventId": "5",
                "types": ["a", "b"],
                "statuses": ["STATUS_DEAD_LETTER", "STATUS_FAILED"],
            })
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                "ListWebhooks",
                None,
                Some("pageSize=ten"),
                "",
                "pageSize: `ten` is not a 32-bit integer",
            ),
            (
                "ListWebhooks",
                None,
                Some("status=STATUS_BOGUS"),
                "",
                "status: `STATUS_BOGUS` is not a value of Status",
            ),
            (
                "ListWebhooks",
                None,
                Some("status=42"),
                "",
                "status: `42` is not a value of Status",
            ),
            (
                "ListWebhooks",
                None,
                Some("bogus=1"),
                "",
                "bogus: unknown query parameter",
            ),
            (
                "ListWebhooks",
                None,
                Some("pageSize=1&page_size=2"),
                "",
                "page_size: is given more than once",
            ),
            (
                "ListWebhooks",
                None,
                None,
                "{}",
                "request body: this method takes no request body",
            ),
            (
                "GetStatus",
                Some("wh_1"),
                Some("webhookId=x"),
                "",
                "webhookId: is bound by the URL path",
            ),
            (
                "GetStatus",
                Some("%FF"),
                None,
                "",
                "webhook_id: is not valid UTF-8",
            ),
            (
                "CreateUploadWebhook",
                None,
                Some("filename=x"),
                "",
                "filename: query parameters are not accepted",
            ),
            (
                "CreateUploadWebhook",
                None,
                None,
                r#"{"filename": "a", "bogus": 1}"#,
                "bogus: unknown field",
            ),
            (
                "CreateUploadWebhook",
                None,
                None,
                r#"{"webhook": {"ur1": "x"}}"#,
                "webhook.ur1: unknown field",
            ),
            (
                "CreateUploadWebhook",
                None,
                None,
                r#"{"contentLength": "abc"}"#,
                "contentLength: ",
            ),
            (
                "CreateUploadWebhook",
                None,
                None,
                r#"{"webhook": {"trigger": "NOPE"}}"#,
                "webhook.trigger: ",
            ),
            (
                "CreateUploadWebhook",
                None,
                None,
                r#"{"expires_in": "soon"}"#,
                "expires_in: ",
            ),
            (
                "CreateUploadWebhook",
                None,
                None,
                r#"{"webhook": {"metadata": {"k": 1}}}"#,
                "webhook.metadata: ",
            ),
            (
                "CreateUploadWebhook",
                None,
                None,
                r#"{"filename": "a""#,
                "request body: invalid JSON",
            ),
            (
                "CreateUploadWebhook",
                None,
                None,
                "[1]",
                "request body: must be a JSON object",
            ),
        ];
        for (method, capture, query, body, expected) in cases {
            let captures: Vec<&str> = capture.into_iter().collect();
            let message = transcode_err(method, &captures, query, body);
            assert!(
                message.starts_with(expected),
                "{method} {query:?} {body}: `{message}` does not start with `{expected}`"
            );
        }
    }

    /// A small implementation of the generated trait, to drive the gateway
    /// end to end.
    struct TestService;

    type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEventsResponse, Status>> + Send>>;

    fn hook(id: &str) -> Webhook {
        Webhook {
            id: id.to_owned(),
            status: proto::Status::Pending as i32,
            ..Default::default()
        }
    }

    #[tonic::async_trait]
    impl WebhookService for TestService {
        async fn create_upload_webhook(
            &self,
            request: GrpcRequest<CreateUploadWebhookRequest>,
        ) -> Result<GrpcResponse<CreateUploadWebhookResponse>, Status> {
            let authorization = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let request = request.into_inner();
            let target = request.webhook.unwrap_or_default();
            Ok(GrpcResponse::new(CreateUploadWebhookResponse {
                webhook: Some(Webhook {
                    filename: request.filename,
                    size: request.content_length.unwrap_or_default(),
                    trigger: target.trigger,
                    metadata: target.metadata,
                    url: target.url,
                    created_at: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 0,
                    }),
                    ..hook("wh_new")
                }),
                upload_method: "PUT".into(),
                // The test reads the forwarded header back from here.
                signing_secret: authorization,
                ..Default::default()
            }))
        }

        async fn confirm(
            &self,
            request: GrpcRequest<ConfirmRequest>,
        ) -> Result<GrpcResponse<ConfirmResponse>, Status> {
            let request = request.into_inner();
            Ok(GrpcResponse::new(ConfirmResponse {
                webhook: Some(Webhook {
                    etag: request.etag,
                    status: proto::Status::Verifying as i32,
                    ..hook(&request.webhook_id)
                }),
            }))
        }

        async fn get_status(
            &self,
            request: GrpcRequest<GetStatusRequest>,
        ) -> Result<GrpcResponse<GetStatusResponse>, Status> {
            let id = request.into_inner().webhook_id;
            if id == "wh_missing" {
                return Err(Status::not_found(
                    "webhook wh_missing not found: 100% gone, ü",
                ));
            }
            Ok(GrpcResponse::new(GetStatusResponse {
                webhook: Some(Webhook {
                    attempts: vec![Attempt {
                        number: 1,
                        duration_ms: 12,
                        response_status: 200,
                        ..Default::default()
                    }],
                    ..hook(&id)
                }),
            }))
        }

        type StreamEventsStream = EventStream;

        async fn stream_events(
            &self,
            request: GrpcRequest<StreamEventsRequest>,
        ) -> Result<GrpcResponse<EventStream>, Status> {
            let request = request.into_inner();
            if request.webhook_id == "bad" {
                return Err(Status::invalid_argument("webhook_id: is malformed"));
            }
            let event = |n: i64| {
                Ok(StreamEventsResponse {
                    kind: Some(proto::stream_events_response::Kind::Event(WebhookEvent {
                        event_id: request.after_event_id + n,
                        webhook_id: request.webhook_id.clone(),
                        r#type: "upload.verified".into(),
                        status: proto::Status::Verified as i32,
                        occurred_at: None,
                    })),
                })
            };
            if request.webhook_id == "wh_live" {
                // One event, then a live stream that stays open.
                let live =
                    futures_util::stream::iter([event(1)]).chain(futures_util::stream::pending());
                return Ok(GrpcResponse::new(Box::pin(live)));
            }
            let mut items = vec![event(1), event(2)];
            if request.webhook_id == "wh_fail" {
                items.push(Err(Status::aborted("storage went away")));
            }
            Ok(GrpcResponse::new(Box::pin(futures_util::stream::iter(
                items,
            ))))
        }

        async fn list_webhooks(
            &self,
            request: GrpcRequest<ListWebhooksRequest>,
        ) -> Result<GrpcResponse<ListWebhooksResponse>, Status> {
            let request = request.into_inner();
            Ok(GrpcResponse::new(ListWebhooksResponse {
                webhooks: vec![hook("wh_1")],
                next_page_token: format!(
                    "size={} token={} status={}",
                    request.page_size, request.page_token, request.status
                ),
            }))
        }

        async fn redeliver(
            &self,
            _request: GrpcRequest<RedeliverRequest>,
        ) -> Result<GrpcResponse<RedeliverResponse>, Status> {
            Err(Status::unimplemented("redeliver is not implemented"))
        }

        async fn cancel_webhook(
            &self,
            _request: GrpcRequest<CancelWebhookRequest>,
        ) -> Result<GrpcResponse<CancelWebhookResponse>, Status> {
            Err(Status::unimplemented("cancel is not implemented"))
        }

        async fn rotate_secret(
            &self,
            _request: GrpcRequest<crate::proto::RotateSecretRequest>,
        ) -> Result<GrpcResponse<crate::proto::RotateSecretResponse>, Status> {
            Err(Status::unimplemented("rotate secret is not implemented"))
        }
    }

    fn app() -> Router {
        router(Arc::new(gateway()), WebhookServiceServer::new(TestService))
    }

    /// Sends one request through the router; returns status, headers and body.
    async fn send(
        method: &str,
        uri: &str,
        body: impl Into<AxumBody>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", "Bearer key_1")
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        let response = app().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, bytes)
    }

    async fn send_json(method: &str, uri: &str, body: &str) -> (StatusCode, Json) {
        let (status, headers, bytes) = send(method, uri, body.to_owned()).await;
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&bytes)));
        (status, json)
    }

    fn status_json(code: Code, message: &str) -> Json {
        serde_json::json!({"code": code as i32, "message": message, "details": []})
    }

    #[tokio::test]
    async fn create_round_trips_json_and_forwards_authorization() {
        let (status, json) = send_json(
            "POST",
            "/v1/webhooks",
            r#"{"filename": "a.png", "content_length": 42,
                "webhook": {"url": "https://r.test/h", "trigger": "TRIGGER_AUTO",
                            "metadata": {"k": "v"}}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json,
            serde_json::json!({
                "webhook": {
                    "id": "wh_new",
                    "status": "STATUS_PENDING",
                    "filename": "a.png",
                    "size": "42",
                    "trigger": "TRIGGER_AUTO",
                    "metadata": {"k": "v"},
                    "url": "https://r.test/h",
                    "createdAt": "2023-11-14T22:13:20Z",
                },
                "uploadMethod": "PUT",
                "signingSecret": "Bearer key_1",
            })
        );
    }

    #[tokio::test]
    async fn unknown_field_is_400_naming_the_field() {
        let (status, json) = send_json(
            "POST",
            "/v1/webhooks",
            r#"{"filename": "a.png", "webhook": {"url": "https://r.test", "secrit": "x"}}"#,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            json,
            status_json(Code::InvalidArgument, "webhook.secrit: unknown field")
        );
    }

    #[tokio::test]
    async fn service_errors_map_through_the_shared_table() {
        let (status, json) = send_json("GET", "/v1/webhooks/wh_missing", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            json,
            status_json(Code::NotFound, "webhook wh_missing not found: 100% gone, ü")
        );

        let (status, json) = send_json("POST", "/v1/webhooks/wh_1:redeliver", "").await;
        assert_eq!(status, http_status(Code::Unimplemented));
        assert_eq!(
            json,
            status_json(Code::Unimplemented, "redeliver is not implemented")
        );
    }

    #[tokio::test]
    async fn get_status_renders_int64_as_string() {
        let (status, json) = send_json("GET", "/v1/webhooks/wh_1", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json,
            serde_json::json!({"webhook": {
                "id": "wh_1",
                "status": "STATUS_PENDING",
                "attempts": [{"number": 1, "durationMs": "12", "responseStatus": 200}],
            }})
        );
    }

    #[tokio::test]
    async fn custom_verb_route_reaches_confirm() {
        let (status, json) = send_json(
            "POST",
            "/v1/webhooks/wh_abc:confirm",
            r#"{"etag": "\"e1\""}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            json,
            serde_json::json!({"webhook": {
                "id": "wh_abc", "status": "STATUS_VERIFYING", "etag": "\"e1\"",
            }})
        );
    }

    #[tokio::test]
    async fn list_reads_query_parameters() {
        let (status, json) = send_json(
            "GET",
            "/v1/webhooks?pageSize=10&page_token=abc&status=STATUS_FAILED",
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["nextPageToken"], "size=10 token=abc status=7");
        assert_eq!(json["webhooks"][0]["id"], "wh_1");

        let (status, json) = send_json("GET", "/v1/webhooks?pageSize=ten", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            json,
            status_json(
                Code::InvalidArgument,
                "pageSize: `ten` is not a 32-bit integer"
            )
        );
    }

    #[tokio::test]
    async fn unmatched_routes_answer_404_and_405() {
        let (status, json) = send_json("GET", "/v2/nothing", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            json,
            status_json(Code::NotFound, "no route for GET /v2/nothing")
        );

        let (status, headers, _) = send("DELETE", "/v1/webhooks", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "GET, POST");
        let (_, json) = send_json("DELETE", "/v1/webhooks", "").await;
        assert_eq!(json["code"], Code::Unimplemented as i32);
    }

    #[tokio::test]
    async fn oversized_body_is_413() {
        let body = format!(
            r#"{{"filename": "{}"}}"#,
            "a".repeat(MAX_REQUEST_BODY_BYTES)
        );
        // A declared Content-Length is refused before reading.
        let request = http::Request::builder()
            .method("POST")
            .uri("/v1/webhooks")
            .header("content-length", body.len())
            .body(AxumBody::from(body.clone()))
            .unwrap();
        let response = app().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: Json = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["code"], Code::ResourceExhausted as i32);

        // Without a Content-Length, the limit applies while reading.
        let chunks = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from(
            body.clone().into_bytes(),
        ))]);
        let (status, _, _) = send("POST", "/v1/webhooks", AxumBody::from_stream(chunks)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn streams_events_as_sse() {
        let (status, headers, body) =
            send("GET", "/v1/events:stream?webhookId=wh_1&afterEventId=3", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
        let event = |id: u32| {
            format!(
                r#"data: {{"event":{{"eventId":"{id}","webhookId":"wh_1","type":"upload.verified","status":"STATUS_VERIFIED"}}}}"#
            )
        };
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!("{}\n\n{}\n\n", event(4), event(5))
        );
    }

    #[tokio::test]
    async fn live_stream_is_not_buffered() {
        let request = http::Request::builder()
            .uri("/v1/events:stream?webhookId=wh_live")
            .body(AxumBody::empty())
            .unwrap();
        // The stream never ends: the first event must arrive on its own. The
        // timeout only keeps a regression from hanging the test run.
        let first_event = async {
            let response = app().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let frame = response.into_body().frame().await.unwrap().unwrap();
            frame.into_data().unwrap()
        };
        let data = tokio::time::timeout(std::time::Duration::from_secs(10), first_event)
            .await
            .expect("the first event arrives while the stream is open");
        assert!(
            data.starts_with(b"data: {\"event\":{\"eventId\":\"1\""),
            "{data:?}"
        );
    }

    #[tokio::test]
    async fn stream_error_after_messages_is_an_error_event() {
        let (status, _, body) = send("GET", "/v1/events:stream?webhookId=wh_fail", "").await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8_lossy(&body).into_owned();
        let events: Vec<&str> = text.split_terminator("\n\n").collect();
        assert_eq!(events.len(), 3, "{text}");
        assert!(events[0].starts_with("data: "));
        assert_eq!(
            events[2],
            r#"event: error
data: {"code":10,"details":[],"message":"storage went away"}"#
        );
    }

    #[tokio::test]
    async fn stream_error_before_any_message_is_plain_json() {
        let (status, json) = send_json("GET", "/v1/events:stream?webhookId=bad", "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            json,
            status_json(Code::InvalidArgument, "webhook_id: is malformed")
        );
    }
}
