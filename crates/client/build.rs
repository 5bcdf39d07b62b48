//! Generates the gRPC client stubs for etcd's v3 services (KV, Watch, Lease,
//! Cluster, Maintenance, Lock, Election). Clients only: the client crate must
//! not depend on the server crate, and a server stub here would only add
//! compile time. The messages come from `keel-types` through `extern_path`, so
//! a `keel_types::etcdserverpb::PutRequest` is what the stubs take.

fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc is available");
    let proto_dir = "../types/proto";
    let protos = [
        "../types/proto/rpc.proto",
        "../types/proto/v3lock.proto",
        "../types/proto/v3election.proto",
    ];
    println!("cargo:rerun-if-changed={proto_dir}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .extern_path(".mvccpb", "::keel_types::mvccpb")
        .extern_path(".authpb", "::keel_types::authpb")
        .extern_path(".etcdserverpb", "::keel_types::etcdserverpb")
        .extern_path(".v3lockpb", "::keel_types::v3lockpb")
        .extern_path(".v3electionpb", "::keel_types::v3electionpb")
        .compile_with_config(config, &protos, &[proto_dir])
        .expect("etcd service definitions compile");
}
