// Wrapper module for building the etcd server binary: `go install` refuses
// go.etcd.io/etcd/server/v3 because its go.mod has replace directives, but a
// module that merely requires it builds fine (replaces of dependencies are ignored).
module corral.local/k8s-tools/etcd

go 1.24

require go.etcd.io/etcd/server/v3 @ETCD_VERSION@
