//! State files the tests of `declare` share.

/// The complete example the deployment docs point at.
pub(super) const EXAMPLE: &str = include_str!("../../deploy/state.example.toml");

/// One model with two versions, an experiment between them and a shadow.
pub(super) const BASIC: &str = r#"
[[models]]
name = "iris"
  [[models.versions]]
  key = "v1"
  endpoint = "http://127.0.0.1:8081"
  stage = "production"
  metrics = { accuracy = 0.93 }
  [[models.versions]]
  key = "v2"
  endpoint = "127.0.0.1:8082"
  backend_model = "iris"
  backend_version = "2"

[[experiments]]
name = "iris-ab"
model = "iris"
variants = [ { name = "control", version = "v1", weight = 1.0 }, { name = "treatment", version = "v2", weight = 1 } ]
coverage = 0.5

[[shadows]]
model = "iris"
version = "v2"
sample_fraction = 0.1
"#;
