module moor/shim

go 1.19
