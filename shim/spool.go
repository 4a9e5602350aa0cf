package main

// The DEL spool: a DEL the daemon could not take, persisted for it to replay when it starts.

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// spoolDelete persists a DEL for the daemon to replay: (true, "") when it is safely on disk,
// (false, "") when the spool is full, else the error as Python's str(OSError) words it.
func spoolDelete(spool, header string) (bool, string) {
	err := retry(func() error { return syscall.Mkdir(spool, 0o700) })
	if err != nil && err != syscall.EEXIST {
		return false, osError(err.(syscall.Errno), spool)
	}
	count, err := countEntries(spool)
	if err != nil {
		return false, osError(err.(syscall.Errno), spool)
	}
	if count >= spoolLimit {
		return false, ""
	}
	stamp := strconv.FormatInt(time.Now().UnixNano(), 10)
	name := strings.Repeat("0", 20-len(stamp)) + stamp + "-" + strconv.Itoa(os.Getpid())
	tmp := spool + "/.tmp-" + name
	var fd int
	err = retry(func() (e error) {
		fd, e = syscall.Open(tmp, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_EXCL|syscall.O_CLOEXEC,
			0o600)
		return
	})
	if err != nil {
		return false, osError(err.(syscall.Errno), tmp)
	}
	err = writeAll(fd, header)
	if err == nil {
		err = writeAll(fd, config)
	}
	if err == nil {
		err = retry(func() error { return syscall.Fsync(fd) })
	}
	if closeErr := syscall.Close(fd); closeErr != nil {
		err = closeErr // as in Python, where the close in `finally` raises over the first error
	}
	if err != nil {
		return false, osError(err.(syscall.Errno))
	}
	final := spool + "/" + name
	if err := syscall.Rename(tmp, final); err != nil {
		return false, osError(err.(syscall.Errno), tmp, final)
	}
	return true, ""
}
