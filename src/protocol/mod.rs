//! The protocol seam: what a wire protocol tells the data plane, so that routing, records,
//! experiments, shadows and drift work the same for every protocol.
//!
//! A protocol ([`Protocol`]) classifies a call by its path ([`Call`]), frames and unframes its
//! messages, decodes an inference request ([`InferRequest`]: the model and version it names, the
//! unit id in its parameters, its [`Inputs`] for records), names the model of the other calls
//! that name one, rewrites a request for a backend's own model name and version, reads an
//! answer's [`Outputs`] ([`InferAnswer`]), and shapes modelgate's own errors as its responses.
//! Everything past the seam sees only those neutral values: `record` reads features and
//! predictions from `Inputs` and `Outputs`, `shadow` compares what they give, `drift` watches the
//! features.
//!
//! The decoding work for records is lazy: the request path keeps the decoded request as it is
//! (in an `Arc`, shared by the record and the shadow copies) and the answer's bytes, and the record
//! writer thread asks for `Inputs` and `Outputs`, so a protocol adds no copy or conversion to
//! the request path.
//!
//! One module per protocol: [`oip_grpc`] (the Open Inference Protocol over gRPC), [`tfs_grpc`]
//! (TF Serving's `PredictionService`) and [`grpc`] (plain gRPC, forwarded untouched; it claims
//! every path no other protocol does). The REST protocols ([`oip_rest`], [`kserve_v1`]) are
//! translations to OIP gRPC (`crate::proxy::rest`). [`wire`] reads
//! and rewrites protobuf fields without decoding, for protocols whose messages are protobuf.

pub mod grpc;
pub mod kserve_v1;
pub mod oip_grpc;
pub mod oip_rest;
pub mod tfs_grpc;
/// The protobuf wire format, read and rewritten unparsed (`crate::wire`: OIP's tensors and the
/// feature store read it too).
pub use crate::wire;

use std::fmt::Debug;
use std::sync::Arc;

use bytes::Bytes;
use tonic::{body::Body, Status};

use crate::routing::Route;
pub use crate::tensor::{Inputs, Outputs, Wanted};
use grpc::FrameError;

/// What the data plane does with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// A unary inference (`ModelInfer`): routed by the model its request names, read for
    /// features and predictions, recorded, copied to shadows.
    Infer,
    /// A unary call that names a model (OIP's `ModelMetadata`, `ModelReady`, Triton's
    /// `ModelConfig`, `ModelStatistics`, `RepositoryModelLoad`/`Unload`, `TraceSetting`): routed
    /// by that name, with the backend's name written in.
    Model(ModelCall),
    /// A stream of inferences (Triton's `ModelStreamInfer`): routed by the model its first
    /// message names; every inference in it is recorded like an `Infer`.
    Stream,
    /// A server-level call (`ServerLive` / `ServerReady` / `ServerMetadata`): the default
    /// model's upstream, or modelgate.
    Server(ServerCall),
    /// A call of the protocol that names no model (Triton's `RepositoryIndex`, shared memory,
    /// log settings): the default model's upstream.
    Unnamed,
    /// Health and reflection, answered by modelgate itself.
    Local,
    /// Anything else: forwarded untouched, routed by `x-model-name` or the default model.
    PassThrough,
}

/// Where a unary call names its model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelCall {
    /// The request message, for error messages.
    pub message: &'static str,
    /// The field naming the model, for error messages.
    pub name: &'static str,
    /// Whether the model may be left out (then the call goes to the default model).
    pub optional: bool,
    /// Where the protocol reads the name and version: for protobuf messages, the string field
    /// numbers of the name and of the version (when the message has one).
    pub fields: (u32, Option<u32>),
}

/// The server-level calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCall {
    /// Liveness.
    Live,
    /// Readiness.
    Ready,
    /// Server metadata.
    Metadata,
}

/// The model and version a call names (empty when it names none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    /// Model name.
    pub model: String,
    /// Version: a modelgate version number or alias.
    pub version: String,
}

/// A wire protocol modelgate reads. Implementations are unit structs in `static`s, so that a
/// record or a shadow copy can carry the protocol that reads its messages as a `&'static dyn
/// Protocol`.
pub trait Protocol: Send + Sync + Debug + 'static {
    /// A short name, for logs and errors.
    fn name(&self) -> &'static str;

    /// What a call to `path` is; `None` when the path is not this protocol's.
    fn classify(&self, path: &str) -> Option<Call>;

    /// The message of a whole unary body (gRPC: the one length-prefixed message).
    fn message(&self, body: &Bytes) -> Result<Bytes, ProtocolError>;

    /// A message as a whole unary body (the inverse of [`Protocol::message`]).
    fn body(&self, msg: &[u8]) -> Bytes;

    /// Decodes an inference request's message ([`Call::Infer`], and each message of a
    /// [`Call::Stream`]) sent to `path` (where a REST protocol names the model). A request that
    /// names no model is an error. (Only protocols that classify calls as inferences implement
    /// it.)
    fn decode_infer(
        &self,
        _path: &str,
        _msg: Bytes,
    ) -> Result<Arc<dyn InferRequest>, ProtocolError> {
        Err(ProtocolError::Opaque(self.name()))
    }

    /// The model and version a [`Call::Model`] to `path` names (in its message `msg`, or in the
    /// path).
    fn named(&self, _call: &ModelCall, _path: &str, _msg: &[u8]) -> Result<Named, ProtocolError> {
        Err(ProtocolError::Opaque(self.name()))
    }

    /// `msg` (of a `call` that named `named` = (model, version)) rewritten for `route`'s backend:
    /// its backend model name when it has one, and its backend version — the version a caller
    /// names is modelgate's. `None` when the message is right as it is.
    fn rewrite(
        &self,
        _call: &Call,
        _msg: &[u8],
        _named: (&str, &str),
        _route: &Route,
    ) -> Result<Option<Bytes>, ProtocolError> {
        Ok(None)
    }

    /// Decodes the message of an inference's answer, for its outputs. The error says why it is
    /// not one (it lands in the record's note).
    fn read_answer(&self, _msg: &Bytes) -> Result<Box<dyn InferAnswer>, String> {
        Err(format!("{} answers are not read", self.name()))
    }

    /// One answer message of a [`Call::Stream`]: which request it answers, whether it reports
    /// a failure, and the inference answer it carries.
    fn stream_answer(&self, _msg: &Bytes) -> StreamAnswer {
        StreamAnswer::default()
    }

    /// modelgate's answer to a [`Call::Server`] when no default model's server can answer it:
    /// live, ready when `ready` (some model is routed), and modelgate's name and version.
    fn server_response(&self, call: ServerCall, _ready: bool) -> http::Response<Body> {
        self.error_response(Status::unimplemented(format!(
            "{call:?} is not a {} call",
            self.name()
        )))
    }

    /// modelgate's own error for a call of this protocol, as this protocol's response.
    fn error_response(&self, status: Status) -> http::Response<Body>;
}

/// An inference request, read on the request path as far as routing needs (a protocol may
/// decode it whole or only scan it); what records need from it ([`InferRequest::inputs`]) is
/// computed on the record writer thread.
pub trait InferRequest: Send + Sync + Debug {
    /// The protocol that decoded it, and reads its answer.
    fn protocol(&self) -> &'static dyn Protocol;

    /// The model it names.
    fn model(&self) -> &str;

    /// The version it names (empty: none).
    fn version(&self) -> &str;

    /// The request's own id, if it carries one (what a streamed answer names).
    fn id(&self) -> &str;

    /// A request parameter as text (where a unit id or an entity id may be).
    fn parameter(&self, key: &str) -> Option<String>;

    /// Checks the declared tensor shapes against a limit of elements per tensor, without
    /// decoding them.
    fn check(&self, max_elements: usize) -> Result<(), ProtocolError>;

    /// The inputs, decoded (at most `max_elements` per tensor).
    fn inputs(&self, max_elements: usize) -> Result<Inputs, String>;
}

/// One answer message of a stream of inferences.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamAnswer {
    /// The id of the request it answers (empty: the oldest unanswered one).
    pub id: String,
    /// Whether it reports that the inference failed.
    pub failed: bool,
    /// The inference answer's message, when it carries one.
    pub response: Option<Bytes>,
}

/// A decoded inference answer.
pub trait InferAnswer {
    /// The outputs `wanted`, decoded (at most `max_elements` per tensor). A named output that
    /// is not there is left out, not an error.
    fn outputs(&self, wanted: Wanted<'_>, max_elements: usize) -> Result<Outputs, String>;
}

/// The protocols, in the order they are asked to classify a path. Plain gRPC comes last: it
/// claims every path.
pub static PROTOCOLS: [&'static dyn Protocol; 3] =
    [&oip_grpc::OIP_GRPC, &tfs_grpc::TFS_GRPC, &grpc::GRPC];

/// The protocol of a call to `path`, and what the call is.
pub fn classify(path: &str) -> (&'static dyn Protocol, Call) {
    PROTOCOLS
        .iter()
        .find_map(|p| p.classify(path).map(|c| (*p, c)))
        .unwrap_or((&grpc::GRPC, Call::PassThrough))
}

/// Why a protocol could not read a request.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The body is not one message.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The message does not decode.
    #[error("request is not a valid {message}: {error}")]
    Decode {
        /// The message type.
        message: &'static str,
        /// Why.
        error: prost::DecodeError,
    },
    /// The field naming the model is empty.
    #[error("{0}: required (the model to route to)")]
    MissingModel(&'static str),
    /// The message cannot be scanned for its fields.
    #[error("request is not a valid {message}: {error}")]
    Wire {
        /// The message type.
        message: &'static str,
        /// Why.
        error: wire::WireError,
    },
    /// A tensor's declared shape is refused.
    #[error("{0}")]
    Tensor(crate::oip::OipError),
    /// The protocol does not read this call (a plain gRPC call is opaque).
    #[error("{0} calls are not read")]
    Opaque(&'static str),
}

impl ProtocolError {
    /// The status the caller gets.
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            ProtocolError::Frame(FrameError::Compressed) => Status::unimplemented(msg),
            ProtocolError::Tensor(crate::oip::OipError::TooLarge { .. }) => {
                Status::resource_exhausted(format!("{msg} (--max-tensor-elements)"))
            }
            ProtocolError::Frame(_)
            | ProtocolError::Decode { .. }
            | ProtocolError::MissingModel(_)
            | ProtocolError::Wire { .. }
            | ProtocolError::Tensor(_) => Status::invalid_argument(msg),
            ProtocolError::Opaque(_) => Status::internal(msg),
        }
    }
}
