//! Compiles the protos with protox (pure Rust), so building needs no `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "inference/grpc_service.proto",
    "edgefleet/v1/agent.proto",
    "edgefleet/v1/operator.proto",
    "edgefleet/v1/models.proto",
    "onnx/onnx.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // One descriptor set per server, for gRPC reflection: the agent's holds
    // the Open Inference Protocol alone, the control plane's its own API.
    // The agent's leaves out the comments (source code info): two thirds of
    // its bytes, decoded into the agent's heap at start, on a device where
    // memory is short; the .proto and docs/agent.md have them. The control
    // plane's keeps them, for operators exploring its API with grpcurl.
    for (file, package, comments) in [
        ("inference_descriptor.bin", "inference", false),
        ("edgefleet_descriptor.bin", "edgefleet.v1", true),
    ] {
        let mut set = fds.clone();
        set.file.retain(|file| file.package() == package);
        if !comments {
            for file in &mut set.file {
                file.source_code_info = None;
            }
        }
        std::fs::write(out_dir.join(file), prost::Message::encode_to_vec(&set))?;
    }
    // The Open Inference Protocol gets a codec of its own (src/inference_codec.rs):
    // prost's, plus a memory check of a ModelInferRequest before it is decoded.
    let (mut inference, mut others) = (fds.clone(), fds);
    inference.file.retain(|file| file.package() == "inference");
    others.file.retain(|file| file.package() != "inference");
    tonic_prost_build::configure()
        // Tensor payloads: the agent reads a request's tensors where the
        // decoder left them, and answers with the runtime's output bytes,
        // without a copy on either side.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .codec_path("crate::inference_codec::InferenceCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(inference)?;
    tonic_prost_build::configure()
        // Blob chunks are the bulk of a model download: `Bytes` lets the
        // decoder hand them over without copying.
        .bytes(".edgefleet.v1.BlobChunk.data")
        .build_server(true)
        .build_client(true)
        .compile_fds(others)?;
    Ok(())
}
