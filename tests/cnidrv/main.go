// Command cnidrv is a cnitool-compatible CNI driver that moor's end-to-end tests use as their
// "real runtime library" client. Debian bookworm packages libcni (golang-github-appc-cni-dev
// 1.1.2) but no cnitool binary, and the test hosts cannot download one, so this small program
// builds against the packaged libcni and drives plugins exactly the way a container runtime
// linking libcni would: same stdin config, same CNI_* environment, same result cache.
//
//	cnidrv add|check|del|gc|status <net> <netns-path>
//
// Environment, as upstream cnitool: NETCONFPATH (default /etc/cni/net.d), CNI_PATH, CNI_ARGS
// ("K=V;K=V"), CAP_ARGS (JSON object of capability args), CNI_IFNAME (default eth0; set but
// empty is passed on, like cnitool). Extensions: CNI_CACHE_DIR (libcni cache dir, default
// /var/lib/cni); CNI_CONTAINERID (overrides the "cnitool-<hex sha512(abs netns)[:10]>" ID);
// CNI_VALID_ATTACHMENTS (gc only: JSON list of {"containerID","ifname"} to keep and to send as
// cni.dev/valid-attachments; unset means upstream cnitool behaviour: DEL every cached
// attachment of the network, then GC without an attachments key).
// add prints the result JSON; errors go to stderr as one line with exit status 1.
//
// libcni 1.1.2 knows CNI spec versions up to 1.0.0 and has neither GC nor STATUS:
//   - it loads and parses a conflist with "cniVersion": "1.1.0" without complaint;
//   - ADD fails after the plugin ran if the plugin answers with a 1.1.0 result
//     ("unsupported CNI result version"); nothing is cached, the attachment is left behind.
//     A 1.0.0 result to a 1.1.0 config is accepted and cached;
//   - CHECK and DEL then fail before any plugin runs, because the cached 1.0.0 result cannot
//     be converted to 1.1.0 (libcni >= 1.2 drops the bad cache entry on DEL and carries on).
//     Without a cache entry both run the plugins, with no prevResult;
//   - gc and status are implemented here after libcni >= 1.2 (GCNetworkList and
//     GetStatusNetworkList): lists older than 1.1.0 get no GC/STATUS call at all.
//
// After a successful add the netns path is written into the cache entry ("netns", as libcni >=
// 1.2 does) so that gc can DEL stale attachments with their netns.
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
)

const usage = "usage: cnidrv add|check|del|gc|status <net> <netns-path>"

// gcAttachment is one entry of cni.dev/valid-attachments (CNI spec 1.1).
type gcAttachment struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifname"`
}

// cacheEntry holds the fields of a libcni result-cache file that gc needs.
type cacheEntry struct {
	Kind           string                 `json:"kind"`
	ContainerID    string                 `json:"containerId"`
	IfName         string                 `json:"ifName"`
	NetworkName    string                 `json:"networkName"`
	NetNS          string                 `json:"netns"`
	CniArgs        [][2]string            `json:"cniArgs"`
	CapabilityArgs map[string]interface{} `json:"capabilityArgs"`
}

type driver struct {
	cni      *libcni.CNIConfig
	exec     invoke.Exec
	list     *libcni.NetworkConfigList
	cacheDir string
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(1)
	}
}

func run(argv []string) error {
	if len(argv) < 3 {
		return errors.New(usage)
	}
	verb, netName := argv[0], argv[1]
	switch verb {
	case "add", "check", "del", "gc", "status":
	default:
		return fmt.Errorf("unknown command %q; %s", verb, usage)
	}
	netdir := os.Getenv("NETCONFPATH")
	if netdir == "" {
		netdir = "/etc/cni/net.d"
	}
	list, err := libcni.LoadConfList(netdir, netName)
	if err != nil {
		return err
	}
	var capArgs map[string]interface{}
	if s := os.Getenv("CAP_ARGS"); s != "" {
		if err := json.Unmarshal([]byte(s), &capArgs); err != nil {
			return fmt.Errorf("invalid CAP_ARGS: %w", err)
		}
	}
	cniArgs, err := parseCNIArgs(os.Getenv("CNI_ARGS"))
	if err != nil {
		return err
	}
	ifName, ok := os.LookupEnv("CNI_IFNAME")
	if !ok {
		ifName = "eth0"
	}
	netns, err := filepath.Abs(argv[2])
	if err != nil {
		return err
	}
	containerID := os.Getenv("CNI_CONTAINERID")
	if containerID == "" {
		sum := sha512.Sum512([]byte(netns))
		containerID = fmt.Sprintf("cnitool-%x", sum[:10])
	}

	d := &driver{list: list, cacheDir: os.Getenv("CNI_CACHE_DIR")}
	d.exec = &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}
	d.cni = libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), d.cacheDir, d.exec)
	if d.cacheDir == "" {
		d.cacheDir = libcni.CacheDir
	}
	rt := &libcni.RuntimeConf{ContainerID: containerID, NetNS: netns, IfName: ifName, Args: cniArgs, CapabilityArgs: capArgs}

	ctx := context.Background()
	switch verb {
	case "add":
		result, err := d.cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		if err := d.recordNetNS(rt); err != nil {
			return err
		}
		return result.Print()
	case "check":
		return d.cni.CheckNetworkList(ctx, list, rt)
	case "del":
		return d.cni.DelNetworkList(ctx, list, rt)
	case "gc":
		return d.gc(ctx)
	default:
		return d.status(ctx)
	}
}

// parseCNIArgs splits "K=V;K=V"; like cnitool it rejects pairs with an empty key or value.
func parseCNIArgs(s string) ([][2]string, error) {
	if s == "" {
		return nil, nil
	}
	var out [][2]string
	for _, pair := range strings.Split(s, ";") {
		kv := strings.Split(pair, "=")
		if len(kv) != 2 || kv[0] == "" || kv[1] == "" {
			return nil, fmt.Errorf("invalid CNI_ARGS pair %q", pair)
		}
		out = append(out, [2]string{kv[0], kv[1]})
	}
	return out, nil
}

func (d *driver) cacheFile(containerID, ifName string) string {
	return filepath.Join(d.cacheDir, "results", d.list.Name+"-"+containerID+"-"+ifName)
}

// recordNetNS adds "netns" to the cache entry libcni 1.1.2 just wrote (libcni >= 1.2 stores it).
func (d *driver) recordNetNS(rt *libcni.RuntimeConf) error {
	path := d.cacheFile(rt.ContainerID, rt.IfName)
	var entry map[string]interface{}
	data, err := os.ReadFile(path)
	if err == nil {
		err = json.Unmarshal(data, &entry)
	}
	if err == nil {
		entry["netns"] = rt.NetNS
		data, err = json.Marshal(entry)
	}
	if err == nil {
		err = os.WriteFile(path, data, 0o600)
	}
	if err != nil {
		return fmt.Errorf("recording netns in cache entry %s: %w", path, err)
	}
	return nil
}

// cachedAttachments lists this network's entries in the result cache, like libcni >= 1.2's
// GetCachedAttachments: unreadable or foreign files are skipped.
func (d *driver) cachedAttachments() ([]cacheEntry, error) {
	dir := filepath.Join(d.cacheDir, "results")
	files, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	var out []cacheEntry
	for _, f := range files {
		var e cacheEntry
		data, err := os.ReadFile(filepath.Join(dir, f.Name()))
		if err != nil || json.Unmarshal(data, &e) != nil {
			continue
		}
		if e.Kind == libcni.CNICacheV1 && e.IfName != "" && e.NetworkName == d.list.Name {
			out = append(out, e)
		}
	}
	return out, nil
}

// gc DELs every cached attachment not listed as valid, then (spec >= 1.1.0) sends GC to each plugin.
func (d *driver) gc(ctx context.Context) error {
	var flags struct {
		DisableGC bool `json:"disableGC"`
	}
	if err := json.Unmarshal(d.list.Bytes, &flags); err != nil {
		return fmt.Errorf("error parsing configuration list: %w", err)
	}
	if flags.DisableGC {
		return nil
	}
	var valid []gcAttachment
	s, haveValid := os.LookupEnv("CNI_VALID_ATTACHMENTS")
	if haveValid {
		valid = []gcAttachment{}
		if err := json.Unmarshal([]byte(s), &valid); err != nil {
			return fmt.Errorf("invalid CNI_VALID_ATTACHMENTS: %w", err)
		}
	}
	keep := map[gcAttachment]bool{}
	for _, a := range valid {
		keep[a] = true
	}
	cached, err := d.cachedAttachments()
	if err != nil {
		return err
	}
	var errs []string
	for _, e := range cached {
		if keep[gcAttachment{e.ContainerID, e.IfName}] {
			continue
		}
		rt := &libcni.RuntimeConf{ContainerID: e.ContainerID, NetNS: e.NetNS, IfName: e.IfName, Args: e.CniArgs, CapabilityArgs: e.CapabilityArgs}
		if err := d.cni.DelNetworkList(ctx, d.list, rt); err != nil {
			errs = append(errs, fmt.Sprintf("failed to delete stale attachment %s %s: %v", e.ContainerID, e.IfName, err))
		}
	}
	if atLeast(d.list.CNIVersion, "1.1.0") {
		inject := map[string]interface{}{"name": d.list.Name, "cniVersion": d.list.CNIVersion}
		if haveValid {
			inject["cni.dev/valid-attachments"] = valid
			inject["cni.dev/attachments"] = valid // the key's name in the 1.1.0 spec text
		}
		for _, p := range d.list.Plugins {
			if err := d.call(ctx, "GC", p, inject); err != nil {
				errs = append(errs, fmt.Sprintf("failed to GC plugin %s: %v", p.Network.Type, err))
			}
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// status sends STATUS to each plugin in order and stops at the first failure (spec >= 1.1.0).
func (d *driver) status(ctx context.Context) error {
	if !atLeast(d.list.CNIVersion, "1.1.0") {
		return nil
	}
	inject := map[string]interface{}{"name": d.list.Name, "cniVersion": d.list.CNIVersion}
	for _, p := range d.list.Plugins {
		if err := d.call(ctx, "STATUS", p, inject); err != nil {
			return err
		}
	}
	return nil
}

// call runs one plugin for a command that has no container context (GC, STATUS): CNI_COMMAND and
// CNI_PATH set, CNI_CONTAINERID/NETNS/IFNAME/ARGS empty, as libcni >= 1.2 does.
func (d *driver) call(ctx context.Context, command string, p *libcni.NetworkConfig, inject map[string]interface{}) error {
	conf, err := libcni.InjectConf(p, inject)
	if err != nil {
		return err
	}
	path, err := d.exec.FindInPath(p.Network.Type, d.cni.Path)
	if err != nil {
		return err
	}
	args := &invoke.Args{Command: command, Path: strings.Join(d.cni.Path, string(os.PathListSeparator))}
	return invoke.ExecPluginWithoutResult(ctx, path, conf.Bytes, args, d.exec)
}

func atLeast(v, min string) bool {
	ok, err := version.GreaterThanOrEqualTo(v, min)
	return err == nil && ok
}
