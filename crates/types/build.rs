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
        "proto/chaos.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config
        .compile_protos(&protos, &["proto"])
        .expect("keel's .proto files compile");
}
