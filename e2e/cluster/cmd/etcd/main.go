// Command etcd is upstream etcd's server (go.etcd.io/etcd/server/v3/etcdmain),
// built at the version k8s.io/kubernetes v1.34.4 itself depends on.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
