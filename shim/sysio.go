package main

// The shim's system calls, with the semantics bin/moor gets from Python: EINTR retried
// (PEP 475), a timeout as a deadline that ppoll waits for before each socket call, an AF_UNIX
// address taken as raw bytes (no "@" rewriting as Go's syscall.Connect does), and errors as
// errno values that pytext.go words the way Python does. Linux only (amd64, arm64: every
// call used here is a plain system call there).

import (
	"errors"
	"syscall"
	"time"
	"unsafe"
)

var (
	errTimedOut    = errors.New("timed out")             // Python's TimeoutError text
	errPathTooLong = errors.New("AF_UNIX path too long") // Python's text for it
)

const (
	pollIn  = 0x1
	pollOut = 0x4
)

type pollFd struct {
	fd      int32
	events  int16
	revents int16
}

// waitReady waits until fd is ready for `events`, or returns errTimedOut at the deadline.
func waitReady(fd int, events int16, deadline time.Time) error {
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return errTimedOut
		}
		ts := syscall.NsecToTimespec(int64(left))
		p := pollFd{fd: int32(fd), events: events}
		n, _, e := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&p)), 1,
			uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		if n > 0 {
			return nil
		}
	}
}

// retry runs a system call until it is not interrupted.
func retry(call func() error) error {
	for {
		if err := call(); err != syscall.EINTR {
			return err
		}
	}
}

// readFd reads up to n bytes (0 bytes: end of file).
func readFd(fd, n int) ([]byte, error) {
	buf := make([]byte, n)
	var got int
	err := retry(func() (e error) { got, e = syscall.Read(fd, buf); return })
	if err != nil {
		return nil, err
	}
	return buf[:got], nil
}

// writeAll writes all of data to fd (a plain, blocking write, as Python's posix.write).
func writeAll(fd int, data string) error {
	b := []byte(data)
	for len(b) > 0 {
		var n int
		if err := retry(func() (e error) { n, e = syscall.Write(fd, b); return }); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// connectUnix connects a non-blocking AF_UNIX socket to `path` as Python's connect() does: a
// leading NUL is an abstract address, anything else a path NUL-terminated in sun_path.
func connectUnix(fd int, path string, timeout time.Duration) error {
	var sa syscall.RawSockaddrUnix
	sa.Family = syscall.AF_UNIX
	size := len(path)
	if size > 0 && path[0] == 0 {
		if size > len(sa.Path) {
			return errPathTooLong
		}
	} else {
		if size >= len(sa.Path) {
			return errPathTooLong
		}
		size++
	}
	for i := 0; i < len(path); i++ {
		sa.Path[i] = int8(path[i])
	}
	deadline := time.Now().Add(timeout)
	_, _, e := syscall.Syscall(syscall.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)),
		unsafe.Offsetof(sa.Path)+uintptr(size))
	if e == 0 {
		return nil
	}
	if e != syscall.EINPROGRESS && e != syscall.EINTR {
		return e
	}
	if err := waitReady(fd, pollOut, deadline); err != nil {
		return err
	}
	soErr, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ERROR)
	if err != nil {
		return err
	}
	if soErr != 0 {
		return syscall.Errno(soErr)
	}
	return nil
}

// sendmsg sends `parts` as one message (no copy into one buffer) with `oob` as its ancillary
// data; it returns how many bytes went, perhaps fewer than all.
func sendmsg(fd int, parts [][]byte, oob []byte, deadline time.Time) (int, error) {
	iov := make([]syscall.Iovec, len(parts))
	for i, p := range parts {
		if len(p) > 0 {
			iov[i].Base = &p[0]
		}
		iov[i].SetLen(len(p))
	}
	var msg syscall.Msghdr
	msg.Iov = &iov[0]
	msg.Iovlen = uint64(len(iov)) // uint64 on amd64 and arm64
	if len(oob) > 0 {
		msg.Control = &oob[0]
		msg.SetControllen(len(oob))
	}
	for {
		if err := waitReady(fd, pollOut, deadline); err != nil {
			return 0, err
		}
		n, _, e := syscall.Syscall(syscall.SYS_SENDMSG, uintptr(fd),
			uintptr(unsafe.Pointer(&msg)), syscall.MSG_NOSIGNAL)
		if e == syscall.EINTR || e == syscall.EAGAIN {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return int(n), nil
	}
}

// sendAll sends all of data before the deadline (Python's sendall).
func sendAll(fd int, data []byte, deadline time.Time) error {
	for len(data) > 0 {
		n, err := sendmsg(fd, [][]byte{data}, nil, deadline)
		if err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// recv reads what is there, waiting for it until the deadline.
func recv(fd, n int, deadline time.Time) ([]byte, error) {
	for {
		if err := waitReady(fd, pollIn, deadline); err != nil {
			return nil, err
		}
		chunk, err := readFd(fd, n)
		if err == syscall.EAGAIN {
			continue
		}
		return chunk, err
	}
}

// countEntries is len(posix.listdir(dir)): every entry but "." and "..".
func countEntries(dir string) (int, error) {
	var fd int
	err := retry(func() (e error) {
		fd, e = syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		return
	})
	if err != nil {
		return 0, err
	}
	defer syscall.Close(fd)
	buf := make([]byte, 32<<10)
	count := 0
	for {
		var n int
		if err := retry(func() (e error) { n, e = syscall.ReadDirent(fd, buf); return }); err != nil {
			return 0, err
		}
		if n <= 0 {
			return count, nil
		}
		_, entries, _ := syscall.ParseDirent(buf[:n], -1, nil)
		count += entries // ParseDirent skips "." and ".." itself
	}
}
