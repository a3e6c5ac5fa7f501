/*
 * tinyhttpd: a sample daemon in the way of the small C web servers it
 * stands in for: it will not start without being told what to serve.
 *
 *   tinyhttpd -p PORT -d DOCROOT        (TINYHTTPD_BANNER in the environment)
 *
 * Serves DOCROOT/index.html for every path on 127.0.0.1:PORT, with the
 * banner as a "Server:" header; /version answers "tinyhttpd VERSION BANNER".
 * Without its arguments or its banner it prints its usage and exits 64.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef VERSION
#define VERSION "dev"
#endif

static void usage(void)
{
	fprintf(stderr, "usage: tinyhttpd -p PORT -d DOCROOT (with TINYHTTPD_BANNER set)\n");
	exit(64);
}

int main(int argc, char **argv)
{
	int port = 0, opt, one = 1;
	const char *docroot = NULL;
	const char *banner = getenv("TINYHTTPD_BANNER");
	char index[4096], page[4096];
	size_t page_len = 0;
	struct sockaddr_in addr;
	FILE *f;
	int server;

	while ((opt = getopt(argc, argv, "p:d:")) != -1) {
		if (opt == 'p')
			port = atoi(optarg);
		else if (opt == 'd')
			docroot = optarg;
		else
			usage();
	}
	if (port <= 0 || !docroot || !banner)
		usage();
	snprintf(index, sizeof index, "%s/index.html", docroot);
	f = fopen(index, "r");
	if (!f) {
		perror(index);
		return 66;
	}
	page_len = fread(page, 1, sizeof page, f);
	fclose(f);

	signal(SIGPIPE, SIG_IGN);
	server = socket(AF_INET, SOCK_STREAM, 0);
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
	printf("tinyhttpd %s serving %s on 127.0.0.1:%d\n", VERSION, docroot, port);
	fflush(stdout);
	for (;;) {
		char request[1024], head[512], body[256];
		const char *content = page;
		int head_len, body_len = (int)page_len;
		int client = accept(server, NULL, NULL);
		if (client < 0)
			continue;
		/* One read is enough for the short requests this sample answers. */
		if (read(client, request, sizeof request - 1) > 0) {
			request[sizeof request - 1] = '\0';
			if (strncmp(request, "GET /version ", 13) == 0) {
				body_len = snprintf(body, sizeof body, "tinyhttpd %s %s\n", VERSION, banner);
				content = body;
			}
			head_len = snprintf(head, sizeof head,
					    "HTTP/1.1 200 OK\r\nServer: %s\r\nContent-Length: %d\r\n"
					    "Connection: close\r\n\r\n", banner, body_len);
			if (write(client, head, (size_t)head_len) < 0 ||
			    write(client, content, (size_t)body_len) < 0)
				perror("write");
		}
		close(client);
	}
}
