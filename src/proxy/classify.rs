//! Which kind of call a request path is.

/// gRPC path prefix of the Open Inference Protocol service.
pub const OIP_PREFIX: &str = "/inference.GRPCInferenceService/";

/// What the data plane does with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `ModelInfer`: routed by `model_name`, read for features and predictions.
    OipInfer,
    /// `ModelMetadata` / `ModelReady`: routed by the `name` field.
    OipModel,
    /// `ServerLive` / `ServerReady` / `ServerMetadata`: the default model's upstream, or modelgate.
    OipServer(ServerCall),
    /// Health and reflection, answered by modelgate itself.
    Local,
    /// Anything else: forwarded untouched, routed by `x-model-name` or the default model.
    PassThrough,
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
            "ModelMetadata" | "ModelReady" => Call::OipModel,
            "ServerLive" => Call::OipServer(ServerCall::Live),
            "ServerReady" => Call::OipServer(ServerCall::Ready),
            "ServerMetadata" => Call::OipServer(ServerCall::Metadata),
            // Triton's extensions (ModelStreamInfer, ModelConfig, repository, shared memory…).
            _ => Call::PassThrough,
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
        assert_eq!(
            classify("/inference.GRPCInferenceService/ModelReady"),
            Call::OipModel
        );
        assert_eq!(
            classify("/inference.GRPCInferenceService/ServerLive"),
            Call::OipServer(ServerCall::Live)
        );
        assert_eq!(
            classify("/inference.GRPCInferenceService/ModelStreamInfer"),
            Call::PassThrough
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
