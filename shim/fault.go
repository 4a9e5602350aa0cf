//go:build shimfault

package main

import "syscall"

// Test builds only (go build -tags shimfault, never build/moor): MOOR_SHIM_FAULT=panic makes
// run() hit a real runtime error, so a test sees that a bug answers code 999 JSON, never a Go
// traceback.
func init() {
	if mode, _ := syscall.Getenv("MOOR_SHIM_FAULT"); mode == "panic" {
		faultHook = func() {
			var table []int
			_ = table[len(mode)]
		}
	}
}
