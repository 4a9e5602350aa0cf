package main

// What the shim reads: the environment, stdin (the network config), two paths in the config,
// and the pod netns.

import (
	"strconv"
	"strings"
	"syscall"
)

var fileKinds = map[uint32]string{
	syscall.S_IFIFO: "a FIFO", syscall.S_IFCHR: "a character device",
	syscall.S_IFDIR: "a directory", syscall.S_IFBLK: "a block device",
	syscall.S_IFLNK: "a symlink", syscall.S_IFSOCK: "a socket",
}

// environ is the process environment as Python's posix.environ sees it: entries without "="
// skipped, the first of a repeated name wins, in their order.
type environ struct {
	entries []string
	values  map[string]string
}

func newEnviron() environ {
	env := environ{values: map[string]string{}}
	for _, entry := range syscall.Environ() {
		key, value, found := strings.Cut(entry, "=")
		if !found {
			continue
		}
		if _, seen := env.values[key]; !seen {
			env.values[key] = value
			env.entries = append(env.entries, entry)
		}
	}
	return env
}

func (e environ) get(key string) string { return e.values[key] }

// readStdin reads at most maxRequest + 1 bytes: a bigger config is refused unread. It reads into
// the spare room of one buffer that doubles when full (a config is a few KiB: one allocation).
func readStdin() string {
	data := make([]byte, 0, 64<<10)
	for len(data) <= maxRequest {
		if len(data) == cap(data) {
			size := 2 * cap(data)
			if size > maxRequest+1 {
				size = maxRequest + 1
			}
			data = append(make([]byte, 0, size), data...)
		}
		var n int
		err := retry(func() (e error) { n, e = syscall.Read(0, data[len(data):cap(data)]); return })
		if err != nil {
			fail(5, "cannot read the network config from stdin: "+reason(err.(syscall.Errno)))
		}
		if n == 0 {
			return string(data)
		}
		data = data[:len(data)+n]
	}
	fail(7, "the network config on stdin is over moor's request limit of "+
		strconv.Itoa(maxRequest)+" bytes")
	return ""
}

// configString is the first JSON string value of `key` in the raw config, without a JSON parser
// (as bin/moor's config_string): a value with escapes or a NUL is refused.
// (`config` shadows the global: fail() passes its own snapshot.)
func configString(config, key, fallback string) string {
	at := strings.Index(config, `"`+key+`"`)
	if at < 0 {
		return fallback
	}
	i, n := at+len(key)+2, len(config)
	skip := func() {
		for i < n && strings.IndexByte(" \t\r\n", config[i]) >= 0 {
			i++
		}
	}
	skip()
	if i >= n || config[i] != ':' {
		return fallback
	}
	i++
	skip()
	if i >= n || config[i] != '"' {
		return fallback
	}
	end := strings.IndexByte(config[i+1:], '"')
	if end <= 0 {
		return fallback
	}
	value := config[i+1 : i+1+end]
	if strings.ContainsAny(value, "\\\x00") {
		return fallback
	}
	return value
}

// openNetns returns the fd of a regular file (a bind-mounted netns is one), or -1 with what is
// wrong with it, or the errno when it cannot be stat'ed or opened. A FIFO or device is never
// opened; O_NONBLOCK covers a swap between the stat and the open.
func openNetns(path string) (int, string, syscall.Errno) {
	var st syscall.Stat_t
	if err := retry(func() error { return syscall.Stat(path, &st) }); err != nil {
		return -1, "", err.(syscall.Errno)
	}
	if kind := st.Mode & syscall.S_IFMT; kind != syscall.S_IFREG {
		return -1, kindName(kind), 0
	}
	var fd int
	err := retry(func() (e error) { fd, e = syscall.Open(path, netnsFlags, 0); return })
	if err != nil {
		return -1, "", err.(syscall.Errno)
	}
	if err := syscall.Fstat(fd, &st); err != nil {
		panic("OSError: " + osError(err.(syscall.Errno)) + " (fstat of CNI_NETNS)")
	}
	if kind := st.Mode & syscall.S_IFMT; kind != syscall.S_IFREG {
		syscall.Close(fd)
		return -1, kindName(kind), 0
	}
	return fd, "", 0
}

func kindName(kind uint32) string {
	if name, ok := fileKinds[kind]; ok {
		return name
	}
	return "not a regular file"
}
