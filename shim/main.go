// Command moor is moor's CNI executable as one static binary: the forwarder bin/moor (the
// Python shim) is, for hosts without a Python (CoreOS/Flatcar, Bottlerocket, Talos) or with any
// Python. It behaves exactly like bin/moor: the same codes, messages, request bytes, spool
// entries, limits and timeouts (tests/test_shim.py runs against both, tests/test_shim_static.py
// compares their output byte for byte). bin/moor's comments give the why of each rule.
//
// It sends CNI_* env and stdin over a unix socket to moor-ipamd, with the pod netns as an open fd
// (SCM_RIGHTS), and prints the daemon's reply. VERSION and the "about" text are answered here.
// When the daemon is down: ADD/CHECK/GC answer CNI code 11 and STATUS code 50 at once; DEL is
// written to a root-only spool that the daemon replays before it serves, and exits 0. It never
// hangs and always prints exactly one JSON document (or nothing, on success without a result);
// a bug in it prints code 999.
//
// Wire format (cni_plugin/wire.py):
//
//	request  = "MOOR1\x00" + "KEY=VALUE\x00"... + "\x00" + stdin
//	response = "<exit code> <stdout length>\n" + stdout + stderr
package main

import (
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	// moor's own release (setup.cfg); `moorctl version` reads it from the about text.
	moorVersion    = "0.1.0"
	defaultSocket  = "/run/moor/cni.sock"
	defaultSpool   = "/var/lib/moor/spool"
	spoolLimit     = 256
	connectTimeout = time.Second
	// The daemon answers within its --request-deadline (at most 25 s) plus 0.5 s; this only
	// bounds a wedged daemon.
	replyTimeout = 30 * time.Second
	// The whole request (header + stdin); equal to cni_plugin.wire.MAX_REQUEST (tests check it).
	maxRequest = 4 << 20
	netnsFlags = syscall.O_RDONLY | syscall.O_NONBLOCK | syscall.O_CLOEXEC | syscall.O_NOCTTY
)

var versions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

var (
	// The raw network config once read: errors take their cniVersion from it. Written once by
	// the main goroutine under configMu; fail() may run on the interrupt goroutine, so it reads
	// it under configMu too.
	config   string
	configMu sync.Mutex
	outputMu sync.Mutex // held from the final output until exit: an interrupt cannot add a second
)

// finish prints the final output and exits with `status`.
func finish(status int, stdout, stderr string) {
	outputMu.Lock()
	if err := writeAll(1, stdout); err != nil {
		outputMu.Unlock()
		panic("OSError: " + osError(err.(syscall.Errno)) + " (writing stdout)")
	}
	if stderr != "" {
		_ = writeAll(2, stderr) // a closed stderr must not fail the call
	}
	os.Exit(status)
}

// fail prints the error JSON and exits 1.
func fail(code int, msg string) {
	configMu.Lock()
	version := configString(config, "cniVersion", "1.1.0")
	configMu.Unlock()
	known := false
	for _, v := range versions {
		known = known || v == version
	}
	if !known {
		version = "1.1.0"
	}
	outputMu.Lock()
	_ = writeAll(1, `{"cniVersion": "`+version+`", "code": `+strconv.Itoa(code)+`, "msg": `+
		jsonString(show(msg))+"}\n")
	os.Exit(1)
}

func main() {
	// Ctrl-C answers 11 "interrupted", as Python's KeyboardInterrupt does in bin/moor; started
	// with SIGINT ignored (as Python then leaves it), it stays ignored.
	if !signal.Ignored(os.Interrupt) {
		interrupts := make(chan os.Signal, 1)
		signal.Notify(interrupts, os.Interrupt)
		go func() {
			<-interrupts
			fail(11, "interrupted")
		}()
	}
	defer func() {
		if r := recover(); r != nil {
			bug(r)
		}
	}()
	run()
}

// faultHook is a no-op; a test build (go build -tags shimfault) sets it to fail on request.
var faultHook = func() {}

func run() {
	faultHook()
	env := newEnviron()
	command := env.get("CNI_COMMAND")
	if command == "" {
		finish(0, "", "moor "+moorVersion+": CNI plugin (bridge datapath + node IPAM daemon)\n"+
			"CNI protocol versions supported: "+strings.Join(versions, ", ")+"\n")
	}
	if command == "VERSION" {
		finish(0, `{"cniVersion": "1.1.0", "supportedVersions": ["`+
			strings.Join(versions, `", "`)+"\"]}\n", "")
	}
	read := readStdin()
	configMu.Lock()
	config = read
	configMu.Unlock()
	fields := []string{"MOOR1"}
	for _, entry := range env.entries {
		if strings.HasPrefix(entry, "CNI_") {
			fields = append(fields, entry)
		}
	}
	netnsFd := -1
	netns := env.get("CNI_NETNS")
	if netns != "" && (command == "ADD" || command == "CHECK" || command == "DEL") {
		fd, problem, errno := openNetns(netns)
		netnsFd = fd
		if problem != "" && command != "DEL" { // DEL works without the netns: just pass no fd
			fail(4, "CNI_NETNS "+show(netns)+" is "+problem+", not a network namespace")
		}
		if errno != 0 {
			fields = append(fields, "MOOR_NETNS_ERRNO="+strconv.Itoa(int(errno)))
		}
	}
	header := strings.Join(fields, "\x00") + "\x00\x00"
	if size := len(header) + len(config); size > maxRequest {
		fail(7, "the request is "+strconv.Itoa(size)+" bytes, over moor's request limit of "+
			strconv.Itoa(maxRequest)+" bytes")
	}
	path := configString(config, "daemonSocket", defaultSocket)
	forward(command, path, header, netnsFd)
}

// forward sends the request to the daemon and prints its reply; when the daemon cannot be
// reached it answers 11 (STATUS: 50), or spools a DEL.
func forward(command, path, header string, netnsFd int) {
	sock, err := syscall.Socket(syscall.AF_UNIX,
		syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
	if err != nil {
		panic("OSError: " + osError(err.(syscall.Errno)) + " (socket)")
	}
	if err := connectUnix(sock, path, connectTimeout); err != nil {
		why := "moor-ipamd is not reachable at " + show(path) + ": " + connectError(err)
		if command == "DEL" {
			spooled, problem := spoolDelete(configString(config, "spoolDir", defaultSpool), header)
			if spooled {
				finish(0, "", why+"; DEL spooled for replay\n")
			}
			if problem == "" {
				fail(11, why+"; the DEL spool is full, try again later")
			}
			fail(11, why+"; cannot spool DEL: "+problem)
		}
		if command == "STATUS" {
			fail(50, why)
		}
		fail(11, why)
	}
	sendError := sendRequest(sock, header, netnsFd)
	if netnsFd >= 0 {
		syscall.Close(netnsFd)
	}
	code, stdout, stderr, ok, recvError := receiveReply(sock)
	if !ok {
		problem := sendError
		if problem == "" {
			problem = recvError
		}
		if problem != "" {
			fail(11, "moor-ipamd at "+show(path)+" failed mid-request: "+problem)
		}
		fail(11, "moor-ipamd at "+show(path)+" closed the connection without a reply")
	}
	finish(int(code), stdout, stderr)
}

// connectError is what bin/moor names a failed connect by: the errno's name.
func connectError(err error) string {
	if e, ok := err.(syscall.Errno); ok {
		if name := errnoName(e); name != "" {
			return name
		}
		return strconv.Itoa(int(e))
	}
	return err.Error()
}

// sendRequest sends header and config (the fd with the first bytes), then half-closes: the
// daemon reads until EOF. It returns why sending failed, if it did: the daemon may have
// answered already (a refusal), so the reply is read anyway.
func sendRequest(sock int, header string, netnsFd int) string {
	var oob []byte
	if netnsFd >= 0 {
		oob = syscall.UnixRights(netnsFd)
	}
	head, body := []byte(header), []byte(config)
	sent, err := sendmsg(sock, [][]byte{head, body}, oob, time.Now().Add(replyTimeout))
	if err == nil && sent < len(head) {
		err = sendAll(sock, head[sent:], time.Now().Add(replyTimeout))
		sent = len(head)
	}
	if err == nil && sent-len(head) < len(body) {
		err = sendAll(sock, body[sent-len(head):], time.Now().Add(replyTimeout))
	}
	if err == nil {
		err = syscall.Shutdown(sock, syscall.SHUT_WR)
	}
	return ioError(err)
}

// ioError words a socket error as bin/moor's reason() does; "" for none.
func ioError(err error) string {
	if err == nil {
		return ""
	}
	if e, ok := err.(syscall.Errno); ok {
		return reason(e)
	}
	return err.Error()
}

// receiveReply returns the reply (ok false when there is none, or only part of one) and the
// error that cut it short, if any: a reply already complete (e.g. then a reset) still counts.
func receiveReply(sock int) (code int64, stdout, stderr string, ok bool, problem string) {
	var reply []byte
	deadline := time.Now().Add(replyTimeout)
	for {
		chunk, err := recv(sock, 65536, deadline)
		if err == errTimedOut {
			problem = "no reply within " + strconv.Itoa(int(replyTimeout/time.Second)) + " s"
			break
		}
		if err != nil {
			problem = ioError(err)
			break
		}
		if len(chunk) == 0 {
			break
		}
		reply = append(reply, chunk...)
	}
	text := string(reply)
	head, body, _ := strings.Cut(text, "\n")
	parts := strings.Split(head, " ")
	if len(parts) != 2 {
		return 0, "", "", false, problem
	}
	code, okCode := pyInt(parts[0])
	length, okLength := pyInt(parts[1])
	if !okCode || !okLength || int64(len(body)) < length {
		return 0, "", "", false, problem
	}
	cut := length // Python's body[:length], also for a negative length
	if cut < 0 {
		cut += int64(len(body))
		if cut < 0 {
			cut = 0
		}
	}
	return code, body[:cut], body[cut:], true, problem
}

// bug: anything that panics is a bug in this shim: code 999, never a Go traceback.
func bug(r interface{}) {
	text := "unexpected panic"
	switch v := r.(type) {
	case error:
		text = v.Error()
	case string:
		text = v
	}
	pcs := make([]uintptr, 32)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(3, pcs)])
	var where []string
	for {
		frame, more := frames.Next()
		if strings.HasPrefix(frame.Function, "main.") {
			where = append(where, frame.Function+" line "+strconv.Itoa(frame.Line))
		}
		if !more {
			break
		}
	}
	_ = writeAll(2, "moor shim bug: "+show(text)+" (at "+strings.Join(where, ", ")+")\n")
	fail(999, "internal error in the moor CNI executable: "+text)
}
