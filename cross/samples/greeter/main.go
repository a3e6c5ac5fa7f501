// greeter: a sample Go daemon that needs a current Go (1.22: a go.mod
// with a toolchain line, and a range over an integer) and, like most
// daemons, its flags and environment:
//
//	greeter -listen 127.0.0.1:8080 -name NAME     (GREETING in the environment)
//
// GET / answers "GREETING, NAME"; /version "greeter VERSION COMMIT"; /healthz
// "ok". Without its flags or GREETING it prints its usage and exits 2.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"strings"
)

// Set at build time by `ferry build go` (-X main.version, -X main.commit).
var (
	version = "dev"
	commit  = "unknown"
)

func main() {
	listen := flag.String("listen", "", "address to listen on (required)")
	name := flag.String("name", "", "who to greet (required)")
	flag.Parse()
	greeting := os.Getenv("GREETING")
	if *listen == "" || *name == "" || greeting == "" {
		fmt.Fprintln(os.Stderr, "usage: greeter -listen ADDR -name NAME (with GREETING set)")
		os.Exit(2)
	}
	var words []string
	for i := range 2 {
		words = append(words, []string{greeting, *name}[i])
	}
	http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, strings.Join(words, ", "))
	})
	http.HandleFunc("/version", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "greeter %s %s\n", version, commit)
	})
	http.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	log.Printf("greeter %s (%s) listening on %s", version, commit, *listen)
	log.Fatal(http.ListenAndServe(*listen, nil))
}
