package main

// Text exactly as bin/moor (the Python shim) words it, so the two shims print the same bytes for
// the same input (tests/test_shim_static.py compares them): Python's UTF-8 "replace" decoding,
// its JSON string escaping, its OSError and bytes reprs, errno names and its int() parsing.

import (
	"strconv"
	"strings"
	"syscall"
	"unicode/utf8"
)

// show is Python's bytes.decode("utf-8", "replace"): one U+FFFD per maximal ill-formed
// subsequence (Go's own decoding would give one per byte, strings.ToValidUTF8 one per run).
func show(b string) string {
	if utf8.ValidString(b) {
		return b
	}
	var out strings.Builder
	for i := 0; i < len(b); {
		c := b[i]
		if c < 0x80 {
			out.WriteByte(c)
			i++
			continue
		}
		n, lo, hi := 0, byte(0x80), byte(0xBF) // continuation bytes, and the second byte's range
		switch {
		case c >= 0xC2 && c <= 0xDF:
			n = 1
		case c == 0xE0:
			n, lo = 2, 0xA0
		case c == 0xED:
			n, hi = 2, 0x9F
		case c >= 0xE1 && c <= 0xEF:
			n = 2
		case c == 0xF0:
			n, lo = 3, 0x90
		case c == 0xF4:
			n, hi = 3, 0x8F
		case c >= 0xF1 && c <= 0xF3:
			n = 3
		}
		j := i + 1
		for k := 0; k < n && j < len(b); k++ {
			if b[j] < lo || b[j] > hi {
				break
			}
			lo, hi = 0x80, 0xBF
			j++
		}
		if n > 0 && j-i == n+1 {
			out.WriteString(b[i:j])
		} else {
			out.WriteString("\uFFFD")
		}
		i = j
	}
	return out.String()
}

// jsonString is bin/moor's json_string for valid UTF-8 text: quote, backslash and every control
// character escaped (\n \r \t by name, the rest as \u00xx).
func jsonString(text string) string {
	const hex = "0123456789abcdef"
	var out strings.Builder
	out.WriteByte('"')
	for i := 0; i < len(text); i++ {
		switch c := text[i]; {
		case c == '"':
			out.WriteString(`\"`)
		case c == '\\':
			out.WriteString(`\\`)
		case c == '\n':
			out.WriteString(`\n`)
		case c == '\r':
			out.WriteString(`\r`)
		case c == '\t':
			out.WriteString(`\t`)
		case c < 0x20:
			out.WriteString(`\u00`)
			out.WriteByte(hex[c>>4])
			out.WriteByte(hex[c&15])
		default:
			out.WriteByte(c)
		}
	}
	out.WriteByte('"')
	return out.String()
}

// errnoName is errno.errorcode.get(e, "").
func errnoName(e syscall.Errno) string {
	if int(e) > 0 && int(e) < len(errnoTable) {
		return errnoTable[e].name
	}
	return ""
}

// strerror is the C library's message, as Python's OSError.strerror holds it.
func strerror(e syscall.Errno) string {
	if int(e) > 0 && int(e) < len(errnoTable) && errnoTable[e].text != "" {
		return errnoTable[e].text
	}
	return "Unknown error " + strconv.Itoa(int(e))
}

// reason is bin/moor's reason(): "No such file or directory (ENOENT)".
func reason(e syscall.Errno) string {
	if name := errnoName(e); name != "" {
		return strerror(e) + " (" + name + ")"
	}
	return osError(e)
}

// osError is str(OSError(errno, strerror, *filenames)) with bytes file names:
// "[Errno 2] No such file or directory: b'/x' -> b'/y'".
func osError(e syscall.Errno, filenames ...string) string {
	text := "[Errno " + strconv.Itoa(int(e)) + "] " + strerror(e)
	for i, name := range filenames {
		if i == 0 {
			text += ": " + bytesRepr(name)
		} else {
			text += " -> " + bytesRepr(name)
		}
	}
	return text
}

// bytesRepr is Python's repr() of a bytes object.
func bytesRepr(b string) string {
	const hex = "0123456789abcdef"
	quote := byte('\'')
	if strings.IndexByte(b, '\'') >= 0 && strings.IndexByte(b, '"') < 0 {
		quote = '"'
	}
	var out strings.Builder
	out.WriteString("b")
	out.WriteByte(quote)
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case c == quote || c == '\\':
			out.WriteByte('\\')
			out.WriteByte(c)
		case c == '\t':
			out.WriteString(`\t`)
		case c == '\n':
			out.WriteString(`\n`)
		case c == '\r':
			out.WriteString(`\r`)
		case c < 0x20 || c >= 0x7f:
			out.WriteString(`\x`)
			out.WriteByte(hex[c>>4])
			out.WriteByte(hex[c&15])
		default:
			out.WriteByte(c)
		}
	}
	out.WriteByte(quote)
	return out.String()
}

// pyInt is Python's int(b) for bytes in base 10: surrounding ASCII whitespace, one sign,
// digits with single underscores between them. Values beyond int64 saturate (only an absurd
// reply holds one; a length then is never reached, an exit status keeps its low byte anyway).
func pyInt(b string) (int64, bool) {
	s := strings.Trim(b, " \t\n\r\v\f")
	negative := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		negative = s[0] == '-'
		s = s[1:]
	}
	if s == "" || s[0] == '_' || s[len(s)-1] == '_' || strings.Contains(s, "__") {
		return 0, false
	}
	var value int64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '_' {
			continue
		}
		if c < '0' || c > '9' {
			return 0, false
		}
		if value >= 1e17 {
			value = 1e18 // saturated: far past any length or status
		} else {
			value = value*10 + int64(c-'0')
		}
	}
	if negative {
		value = -value
	}
	return value, true
}
