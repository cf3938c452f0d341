// Command pod-sd discovers pods through the Kubernetes API server and writes them
// as a Prometheus file_sd target file, with the same __meta_kubernetes_pod_* labels
// that Prometheus' kubernetes_sd_configs (role: pod) produces. Debian's Prometheus
// package is built without the Kubernetes service discovery, so the local cluster
// feeds it this file instead; the relabel rules in prometheus.yml are the ones a
// kubernetes_sd_configs job would use.
//
// Usage: pod-sd -kubeconfig FILE -out FILE
package main

import (
	"context"
	"encoding/json"
	"flag"
	"log"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

type group struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

var invalid = regexp.MustCompile(`[^a-zA-Z0-9_]`)

func sanitize(s string) string { return invalid.ReplaceAllString(s, "_") }

func podGroups(p *corev1.Pod) []group {
	if p.Status.PodIP == "" || p.DeletionTimestamp != nil {
		return nil
	}
	base := map[string]string{
		"__meta_kubernetes_namespace":           p.Namespace,
		"__meta_kubernetes_pod_name":            p.Name,
		"__meta_kubernetes_pod_ip":              p.Status.PodIP,
		"__meta_kubernetes_pod_node_name":       p.Spec.NodeName,
		"__meta_kubernetes_pod_host_ip":         p.Status.HostIP,
		"__meta_kubernetes_pod_uid":             string(p.UID),
		"__meta_kubernetes_pod_phase":           string(p.Status.Phase),
		"__meta_kubernetes_pod_ready":           "false",
		"__meta_kubernetes_pod_controller_kind": "",
		"__meta_kubernetes_pod_controller_name": "",
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			base["__meta_kubernetes_pod_ready"] = map[bool]string{true: "true", false: "false"}[c.Status == corev1.ConditionTrue]
		}
	}
	for _, o := range p.OwnerReferences {
		if o.Controller != nil && *o.Controller {
			base["__meta_kubernetes_pod_controller_kind"] = o.Kind
			base["__meta_kubernetes_pod_controller_name"] = o.Name
		}
	}
	for k, v := range p.Labels {
		base["__meta_kubernetes_pod_label_"+sanitize(k)] = v
		base["__meta_kubernetes_pod_labelpresent_"+sanitize(k)] = "true"
	}
	for k, v := range p.Annotations {
		base["__meta_kubernetes_pod_annotation_"+sanitize(k)] = v
		base["__meta_kubernetes_pod_annotationpresent_"+sanitize(k)] = "true"
	}
	var out []group
	add := func(c corev1.Container, init bool, port *corev1.ContainerPort) {
		l := make(map[string]string, len(base)+6)
		for k, v := range base {
			l[k] = v
		}
		l["__meta_kubernetes_pod_container_name"] = c.Name
		l["__meta_kubernetes_pod_container_image"] = c.Image
		l["__meta_kubernetes_pod_container_init"] = strconv.FormatBool(init)
		addr := p.Status.PodIP
		if port != nil {
			addr += ":" + strconv.Itoa(int(port.ContainerPort))
			l["__meta_kubernetes_pod_container_port_name"] = port.Name
			l["__meta_kubernetes_pod_container_port_number"] = strconv.Itoa(int(port.ContainerPort))
			l["__meta_kubernetes_pod_container_port_protocol"] = string(port.Protocol)
		}
		out = append(out, group{Targets: []string{addr}, Labels: l})
	}
	for _, c := range p.Spec.Containers {
		if len(c.Ports) == 0 {
			add(c, false, nil)
		}
		for i := range c.Ports {
			add(c, false, &c.Ports[i])
		}
	}
	return out
}

func write(path string, pods []*corev1.Pod) error {
	sort.Slice(pods, func(i, j int) bool {
		return pods[i].Namespace+"/"+pods[i].Name < pods[j].Namespace+"/"+pods[j].Name
	})
	groups := []group{}
	for _, p := range pods {
		groups = append(groups, podGroups(p)...)
	}
	b, err := json.MarshalIndent(groups, "", " ")
	if err != nil {
		return err
	}
	if old, err := os.ReadFile(path); err == nil && string(old) == string(b) {
		return nil
	}
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig file")
	out := flag.String("out", "pods.json", "file_sd output file")
	flag.Parse()
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatal(err)
	}
	client := kubernetes.NewForConfigOrDie(cfg)
	factory := informers.NewSharedInformerFactory(client, 0)
	inf := factory.Core().V1().Pods().Informer()
	changed := make(chan struct{}, 1)
	poke := func(interface{}) {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: poke, DeleteFunc: poke, UpdateFunc: func(_, n interface{}) { poke(n) },
	})
	ctx := context.Background()
	factory.Start(ctx.Done())
	cache.WaitForCacheSync(ctx.Done(), inf.HasSynced)
	poke(nil)
	lister := factory.Core().V1().Pods().Lister()
	log.Printf("watching pods, writing %s", *out)
	for range changed {
		pods, err := lister.List(labels.Everything())
		if err == nil {
			err = write(*out, pods)
		}
		if err != nil {
			log.Printf("error: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // coalesce bursts
	}
}
