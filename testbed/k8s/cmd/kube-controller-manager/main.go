// kube-controller-manager for cloudlb's tests: the upstream command, built from the release's Go
// modules. The testbed enables only the controllers the tests need (see tests/support).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
