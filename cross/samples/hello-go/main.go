// hello-go: a sample Ferry service in Go.
//
// It answers HTTP on the port named in the file "port" in its working
// directory (the release; 8080 without one): /healthz for the health gate,
// /version with the version and commit that `ferry build go` stamped in
// with -X main.version and -X main.commit.
package main

import (
	"fmt"
	"log"
	"net/http"
	"os"
	"strings"
)

var (
	version = "dev"
	commit  = "unknown"
)

func main() {
	port := "8080"
	if text, err := os.ReadFile("port"); err == nil {
		port = strings.TrimSpace(string(text))
	}
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	http.HandleFunc("/version", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello-go %s %s\n", version, commit)
	})
	log.Printf("hello-go %s (%s) listening on 127.0.0.1:%s", version, commit, port)
	log.Fatal(http.ListenAndServe("127.0.0.1:"+port, nil))
}
