//! The connection to modelgate's control port: TLS, the token, the call deadline, and what a
//! failed call means for the exit code. Subcommands call the generated clients with prost types
//! ([`Client::channel`], [`Client::request`], [`Client::answer`]); `ctl call` reaches any method
//! with proto JSON through the descriptors modelgate is built with ([`Client::call`]).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Buf;
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use serde_json::Value;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::proxy::upstream::describe;
use crate::telemetry::code_name;

/// Why a control call failed, with the exit code scripts can rely on.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// modelgate could not be reached.
    #[error("cannot reach modelgate's control port at {addr}: {reason}")]
    Connect {
        /// The address tried.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// modelgate answered with an error status; the message is the server's own.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(Status),
    /// The command line or a file it names is wrong (detected before calling).
    #[error("{0}")]
    Usage(String),
}

impl CtlError {
    /// The process exit code: 0 is success; see `docs` / `modelgate ctl --help`.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => 2,
            CtlError::Connect { .. } => 3,
            CtlError::Status(s) => match s.code() {
                Code::Unavailable | Code::DeadlineExceeded => 3,
                Code::NotFound => 4,
                Code::InvalidArgument | Code::OutOfRange => 5,
                Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => 6,
                Code::Unauthenticated | Code::PermissionDenied => 7,
                _ => 1,
            },
        }
    }
}

/// TLS settings of `ctl` (`--ca`, `--cert`, `--key`, `--server-name`); used for `https://`
/// addresses.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificate to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// Name the server's certificate must carry, when not the address's host.
    pub server_name: Option<String>,
}

impl TlsFiles {
    fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.server_name.is_some()
    }

    /// tonic's TLS configuration from the files, each read now so that a missing or unreadable
    /// file is a usage error naming its flag.
    fn config(&self) -> Result<ClientTlsConfig, CtlError> {
        let read = |flag: &str, path: &Path| {
            let pem = std::fs::read(path)
                .map_err(|e| CtlError::Usage(format!("--{flag} {}: {e}", path.display())))?;
            if !pem.starts_with(b"-----BEGIN") && !pem.windows(10).any(|w| w == b"-----BEGIN") {
                return Err(CtlError::Usage(format!(
                    "--{flag} {}: not a PEM file",
                    path.display()
                )));
            }
            Ok(pem)
        };
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read("ca", ca)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

/// The descriptors of every proto modelgate is built with.
pub fn descriptors() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("the built-in descriptors decode")
    })
}

/// A connection to modelgate's control port.
pub struct Client {
    url: String,
    channel: Channel,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    timeout: Duration,
}

impl Client {
    /// Connects to `addr` (`http://host:port`, `https://host:port`, or `host:port`).
    pub async fn connect(
        addr: &str,
        token: Option<&str>,
        tls: &TlsFiles,
        timeout: Duration,
    ) -> Result<Client, CtlError> {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let connect_err = |reason: String| CtlError::Connect {
            addr: url.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| CtlError::Usage(format!("--addr {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5));
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tls.config()?)
                .map_err(|e| CtlError::Usage(format!("TLS settings: {}", describe(&e))))?;
        } else if tls.any() {
            return Err(CtlError::Usage(format!(
                "--ca, --cert, --key and --server-name need an https:// --addr, not {url}"
            )));
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| connect_err(describe(&e)))?;
        let token = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| CtlError::Usage("--token: not a valid header value".into()))?,
            ),
            None => None,
        };
        Ok(Client {
            url,
            channel,
            token,
            timeout,
        })
    }

    /// The descriptor of `Service/Method` (`modelgate.v1.` may be left out).
    pub fn method(&self, name: &str) -> Result<MethodDescriptor, CtlError> {
        let name = name.trim_start_matches('/');
        let (service, method) = name
            .rsplit_once(['/', '.'])
            .filter(|(s, _)| !s.is_empty())
            .ok_or_else(|| CtlError::Usage(format!("{name:?}: expected Service/Method")))?;
        let full = if service.contains('.') {
            service.to_string()
        } else {
            format!("modelgate.v1.{service}")
        };
        let svc = descriptors()
            .get_service_by_name(&full)
            .ok_or_else(|| CtlError::Usage(format!("no service {full:?}")))?;
        let found = svc.methods().find(|m| m.name() == method);
        found.ok_or_else(|| {
            let names: Vec<String> = svc.methods().map(|m| m.name().to_string()).collect();
            CtlError::Usage(format!(
                "{full} has no method {method:?}; it has {}",
                names.join(", ")
            ))
        })
    }

    /// A request carrying the token, due within `--call-timeout`.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = self.open_request(msg);
        req.set_timeout(self.timeout);
        req
    }

    /// A request carrying the token, without a deadline (a stream watched until stopped).
    pub fn open_request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        req
    }

    async fn ready(&self) -> Result<tonic::client::Grpc<Channel>, CtlError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| CtlError::Connect {
            addr: self.url.clone(),
            reason: describe(&e),
        })?;
        Ok(grpc)
    }

    /// The channel for a generated client, once it is ready to call (else modelgate is
    /// unreachable).
    pub async fn channel(&self) -> Result<Channel, CtlError> {
        self.ready().await?;
        Ok(self.channel.clone())
    }

    /// The answer of a call, or why it failed.
    pub fn answer<T>(&self, result: Result<tonic::Response<T>, Status>) -> Result<T, CtlError> {
        result
            .map(tonic::Response::into_inner)
            .map_err(|s| self.failed(s))
    }

    /// A failed call: a status the server sent, or — when the status carries a source error —
    /// a transport failure (a refused TLS client certificate shows up only at the first call).
    pub fn failed(&self, status: Status) -> CtlError {
        // The call's own deadline passing shows up as a transport error too; say which flag
        // sets it rather than that modelgate is unreachable.
        let mut cause = std::error::Error::source(&status);
        while let Some(e) = cause {
            if e.is::<tonic::TimeoutExpired>() {
                return CtlError::Status(Status::deadline_exceeded(format!(
                    "no answer from {} within --call-timeout ({})",
                    self.url,
                    crate::spec::format_duration(self.timeout)
                )));
            }
            cause = e.source();
        }
        match std::error::Error::source(&status) {
            Some(source) => CtlError::Connect {
                addr: self.url.clone(),
                reason: describe(source),
            },
            None => CtlError::Status(status),
        }
    }

    fn path(m: &MethodDescriptor) -> http::uri::PathAndQuery {
        format!("/{}/{}", m.parent_service().full_name(), m.name())
            .parse()
            .expect("method paths are valid")
    }

    /// Calls a unary method named `Service/Method` with a proto-JSON request and returns the
    /// proto-JSON answer (`ctl call`).
    pub async fn call(&self, method: &str, body: Value) -> Result<Value, CtlError> {
        let m = self.method(method)?;
        let msg = to_message(m.input(), body)?;
        let mut grpc = self.ready().await?;
        let resp = grpc
            .unary(self.request(msg), Self::path(&m), DynCodec(m.output()))
            .await
            .map_err(|s| self.failed(s))?;
        Ok(to_json(&resp.into_inner()))
    }
}

/// Builds a message from proto JSON; unknown fields are errors that name them.
pub fn to_message(desc: MessageDescriptor, body: Value) -> Result<DynamicMessage, CtlError> {
    let opts = prost_reflect::DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(desc.clone(), body, &opts)
        .map_err(|e| CtlError::Usage(format!("not a valid {}: {e}", desc.full_name())))
}

/// A typed message from proto JSON, refused as [`to_message`] refuses it.
pub fn from_json<M: Message + Name + Default>(body: Value) -> Result<M, CtlError> {
    let msg = to_message(descriptor::<M>(), body)?;
    Ok(msg
        .transcode_to()
        .expect("a message decodes as its own type"))
}

/// A `google.protobuf.Timestamp` from its proto-JSON form (RFC 3339), checked exactly as a
/// timestamp field of a proto-JSON request is; the error is the one such a request gets.
pub fn timestamp_from_json(text: &str) -> Result<prost_types::Timestamp, String> {
    let msg = DynamicMessage::deserialize(
        descriptor::<prost_types::Timestamp>(),
        Value::String(text.to_string()),
    )
    .map_err(|e| e.to_string())?;
    Ok(msg
        .transcode_to()
        .expect("a timestamp decodes as a timestamp"))
}

/// Proto JSON of a typed message, as [`to_json`] writes it.
pub fn json<M: Message + Name>(msg: &M) -> Value {
    let dynamic = DynamicMessage::decode(descriptor::<M>(), msg.encode_to_vec().as_slice())
        .expect("a message decodes as its own type");
    to_json(&dynamic)
}

fn descriptor<M: Name>() -> MessageDescriptor {
    descriptors()
        .get_message_by_name(&M::full_name())
        .expect("every generated message has a descriptor")
}

/// Proto JSON of a message with every field present (defaults included), 64-bit integers as
/// numbers: a stable shape for scripts.
pub fn to_json(msg: &DynamicMessage) -> Value {
    let opts = prost_reflect::SerializeOptions::new()
        .skip_default_fields(false)
        .stringify_64_bit_integers(false);
    msg.serialize_with_options(serde_json::value::Serializer, &opts)
        .expect("messages serialise to JSON")
}

/// Protobuf encoding of dynamic messages, with the answer's descriptor to decode.
struct DynCodec(MessageDescriptor);

impl Codec for DynCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynEncoder;
    type Decoder = DynDecoder;

    fn encoder(&mut self) -> DynEncoder {
        DynEncoder
    }

    fn decoder(&mut self) -> DynDecoder {
        DynDecoder(self.0.clone())
    }
}

struct DynEncoder;

impl Encoder for DynEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

struct DynDecoder(MessageDescriptor);

impl Decoder for DynDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding the answer: {e}")))
    }
}
