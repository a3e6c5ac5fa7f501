module example.com/greeter

go 1.22

toolchain go1.22.0
