/*
 * hello-c: a sample Ferry service in C.
 *
 * Answers every HTTP request on 127.0.0.1 at the port named in the file
 * "port" in its working directory (the release; 8081 without one) with
 * "hello-c VERSION COMMIT", the values `ferry build c` compiled in.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef FERRY_VERSION
#define FERRY_VERSION "dev"
#endif
#ifndef FERRY_COMMIT
#define FERRY_COMMIT "unknown"
#endif

static int read_port(void)
{
	int port = 8081;
	FILE *f = fopen("port", "r");
	if (f) {
		if (fscanf(f, "%d", &port) != 1)
			port = 8081;
		fclose(f);
	}
	return port;
}

int main(void)
{
	int port = read_port();
	int one = 1;
	struct sockaddr_in addr;
	int server = socket(AF_INET, SOCK_STREAM, 0);

	signal(SIGPIPE, SIG_IGN);
	if (server < 0) {
		perror("socket");
		return 1;
	}
	setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	memset(&addr, 0, sizeof addr);
	addr.sin_family = AF_INET;
	addr.sin_port = htons((unsigned short)port);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(server, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(server, 16) < 0) {
		perror("bind");
		return 1;
	}
	printf("hello-c %s (%s) listening on 127.0.0.1:%d\n", FERRY_VERSION, FERRY_COMMIT, port);
	fflush(stdout);
	for (;;) {
		char request[1024];
		char response[256];
		int body_len, len;
		int client = accept(server, NULL, NULL);
		if (client < 0)
			continue;
		/* One read is enough for the short requests this sample answers. */
		if (read(client, request, sizeof request) > 0) {
			char body[128];
			body_len = snprintf(body, sizeof body, "hello-c %s %s\n", FERRY_VERSION, FERRY_COMMIT);
			len = snprintf(response, sizeof response,
				       "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
				       "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
				       body_len, body);
			if (write(client, response, (size_t)len) < 0)
				perror("write");
		}
		close(client);
	}
}
