//! Generated protobuf and gRPC code, in one place. Conversions between the domain's values and
//! these messages are in `crate::convert`.

/// The Open Inference Protocol v2 (`inference` package).
#[allow(missing_docs, clippy::all)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// TensorFlow's messages that TF Serving's API uses (`tensorflow` package, vendored subset).
#[allow(missing_docs, clippy::all)]
pub mod tensorflow {
    tonic::include_proto!("tensorflow");

    /// TF Serving's API (`tensorflow.serving`): `PredictionService`.
    #[allow(missing_docs, clippy::all)]
    pub mod serving {
        tonic::include_proto!("tensorflow.serving");
    }
}

/// modelgate's control API.
pub mod modelgate {
    /// Version 1 of the control API (`modelgate.v1`).
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("modelgate.v1");
    }
}

/// A service with every call kind, for pass-through tests and examples. Not product API.
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod testing {
    tonic::include_proto!("modelgate.testing");
}

/// Encoded `FileDescriptorSet` of every proto modelgate knows, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/modelgate_descriptor.bin"));

/// A Unix time in milliseconds as a protobuf `Timestamp`.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}
