//! Which kind of call a request path is.

/// gRPC path prefix of the Open Inference Protocol service.
pub const OIP_PREFIX: &str = "/inference.GRPCInferenceService/";

/// What the data plane does with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `ModelInfer`: routed by `model_name`, read for features and predictions.
    OipInfer,
    /// A unary OIP call that names a model (`ModelMetadata`, `ModelReady`, Triton's `ModelConfig`,
    /// `ModelStatistics`, `RepositoryModelLoad`/`Unload`, `TraceSetting`): routed by that name.
    OipModel(ModelCall),
    /// `ModelStreamInfer` (Triton): routed by the model its first message names; every inference
    /// in it is recorded like a `ModelInfer`.
    OipStream,
    /// `ServerLive` / `ServerReady` / `ServerMetadata`: the default model's upstream, or modelgate.
    OipServer(ServerCall),
    /// An OIP-service call that names no model (Triton's `RepositoryIndex`, shared memory, log
    /// settings): the default model's upstream.
    OipUnnamed,
    /// Health and reflection, answered by modelgate itself.
    Local,
    /// Anything else: forwarded untouched, routed by `x-model-name` or the default model.
    PassThrough,
}

/// Where a unary OIP call names its model: the request message's field numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelCall {
    /// The request message, for error messages.
    pub message: &'static str,
    /// The string field naming the model.
    pub name_field: u32,
    /// Its name, for error messages.
    pub name: &'static str,
    /// The string field naming a version, when the message has one.
    pub version_field: Option<u32>,
    /// Whether the model may be left out (then the call goes to the default model).
    pub optional: bool,
}

const fn named(message: &'static str, version: bool) -> ModelCall {
    ModelCall {
        message,
        name_field: 1,
        name: "name",
        version_field: if version { Some(2) } else { None },
        optional: false,
    }
}

const fn repository(message: &'static str) -> ModelCall {
    ModelCall {
        message,
        name_field: 2,
        name: "model_name",
        version_field: None,
        optional: false,
    }
}

/// The OIP server-level calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCall {
    /// ServerLive
    Live,
    /// ServerReady
    Ready,
    /// ServerMetadata
    Metadata,
}

/// Classifies a request path.
pub fn classify(path: &str) -> Call {
    if let Some(method) = path.strip_prefix(OIP_PREFIX) {
        return match method {
            "ModelInfer" => Call::OipInfer,
            "ModelMetadata" => Call::OipModel(named("inference.ModelMetadataRequest", true)),
            "ModelReady" => Call::OipModel(named("inference.ModelReadyRequest", true)),
            "ModelConfig" => Call::OipModel(named("inference.ModelConfigRequest", true)),
            "ModelStatistics" => Call::OipModel(named("inference.ModelStatisticsRequest", true)),
            "RepositoryModelLoad" => {
                Call::OipModel(repository("inference.RepositoryModelLoadRequest"))
            }
            "RepositoryModelUnload" => {
                Call::OipModel(repository("inference.RepositoryModelUnloadRequest"))
            }
            // Trace settings name a model, or none for the server's own.
            "TraceSetting" => Call::OipModel(ModelCall {
                optional: true,
                ..repository("inference.TraceSettingRequest")
            }),
            "ModelStreamInfer" => Call::OipStream,
            "ServerLive" => Call::OipServer(ServerCall::Live),
            "ServerReady" => Call::OipServer(ServerCall::Ready),
            "ServerMetadata" => Call::OipServer(ServerCall::Metadata),
            // RepositoryIndex, shared memory, LogSettings, and whatever Triton adds later.
            _ => Call::OipUnnamed,
        };
    }
    if path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        return Call::Local;
    }
    Call::PassThrough
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_classify() {
        assert_eq!(
            classify("/inference.GRPCInferenceService/ModelInfer"),
            Call::OipInfer
        );
        assert!(matches!(
            classify("/inference.GRPCInferenceService/ModelReady"),
            Call::OipModel(ModelCall {
                name_field: 1,
                version_field: Some(2),
                ..
            })
        ));
        assert!(matches!(
            classify("/inference.GRPCInferenceService/RepositoryModelLoad"),
            Call::OipModel(ModelCall {
                name_field: 2,
                version_field: None,
                optional: false,
                ..
            })
        ));
        assert_eq!(
            classify("/inference.GRPCInferenceService/RepositoryIndex"),
            Call::OipUnnamed
        );
        assert_eq!(
            classify("/inference.GRPCInferenceService/ServerLive"),
            Call::OipServer(ServerCall::Live)
        );
        assert_eq!(
            classify("/inference.GRPCInferenceService/ModelStreamInfer"),
            Call::OipStream
        );
        assert_eq!(classify("/grpc.health.v1.Health/Check"), Call::Local);
        assert_eq!(
            classify("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Call::Local
        );
        assert_eq!(classify("/pkg.Svc/Method"), Call::PassThrough);
        assert_eq!(classify("/"), Call::PassThrough);
    }
}
