//! Generates the prost message types for etcd's v3 wire API and keel's own log
//! records. Only messages are generated here; the gRPC services live in `server`,
//! so that `core` can use the messages without depending on tonic.

fn main() {
    // The vendored protoc means a fresh machine needs no system package to build keel.
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc is available");
    let protos = [
        "proto/kv.proto",
        "proto/auth.proto",
        "proto/rpc.proto",
        "proto/v3lock.proto",
        "proto/v3election.proto",
        "proto/keel.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let descriptor_path = out_dir.join("descriptors.bin");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.file_descriptor_set_path(&descriptor_path);
    config
        .compile_protos(&protos, &["proto"])
        .expect("keel's .proto files compile");

    // serde impls for etcd's messages in the protobuf JSON mapping, as etcd's
    // grpc-gateway writes and reads them: proto field names (grpc-gateway's
    // `OrigName`), 64-bit integers as strings, bytes as base64, enums by name,
    // default values left out, unknown fields refused.
    let descriptors = std::fs::read(&descriptor_path).expect("prost wrote the descriptor set");
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)
        .expect("the descriptor set prost wrote decodes")
        .preserve_proto_field_names()
        .build(&[".mvccpb", ".authpb", ".etcdserverpb"])
        .expect("serde impls for etcd's messages generate");
}
