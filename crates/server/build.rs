//! Generates the gRPC service code (servers and clients) for etcd's v3 API.
//! The messages themselves come from `keel-types`, so they are shared with `core`.

fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc is available");
    let proto_dir = "../types/proto";
    let protos = [
        "../types/proto/rpc.proto",
        "../types/proto/v3lock.proto",
        "../types/proto/v3election.proto",
        "../types/proto/chaos.proto",
    ];
    println!("cargo:rerun-if-changed={proto_dir}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Services we do not implement yet answer Unimplemented, as an etcd
        // client expects from a server without that feature.
        .generate_default_stubs(true)
        .extern_path(".mvccpb", "::keel_types::mvccpb")
        .extern_path(".authpb", "::keel_types::authpb")
        .extern_path(".etcdserverpb", "::keel_types::etcdserverpb")
        .extern_path(".v3lockpb", "::keel_types::v3lockpb")
        .extern_path(".v3electionpb", "::keel_types::v3electionpb")
        .extern_path(".keelchaospb", "::keel_types::keelchaospb")
        .compile_with_config(config, &protos, &[proto_dir])
        .expect("etcd service definitions compile");
}
