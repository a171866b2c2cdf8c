/* parley-nodetest: a tiny static program for the node test (e2e/node), in a FROM-scratch
 * image, so that the test needs no image from a registry.
 *
 *   nodetest serve PORT        HTTP server on 0.0.0.0:PORT: every request gets
 *                              "hello from HOSTNAME" and a line on stdout (kubectl logs)
 *   nodetest get IP PORT PATH  HTTP GET; prints the response; exit 0 on status 200
 *   nodetest tcp IP PORT       exit 0 when a TCP connection opens
 *   nodetest cat FILE          print a file (there is no shell in the image)
 *   nodetest resolve NAME      print NAME's IPv4 addresses (getaddrinfo: the pod's
 *                              resolv.conf, search path and nameserver); exit 1 if none
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int dial(const char *ip, const char *port) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port))};
  if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
    fprintf(stderr, "nodetest: bad IPv4 address %s\n", ip);
    return -1;
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct timeval tv = {.tv_sec = 5};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    fprintf(stderr, "nodetest: connect %s:%s: %s\n", ip, port, strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

static void sigdown(int signo) {
  (void)signo;
  _exit(0);
}

static int serve(const char *port) {
  char host[256] = "?";
  gethostname(host, sizeof host - 1);
  signal(SIGTERM, sigdown);
  signal(SIGINT, sigdown);
  signal(SIGPIPE, SIG_IGN);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port))};
  if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 64) < 0) {
    perror("nodetest: listen");
    return 1;
  }
  printf("listening on port %s\n", port);
  fflush(stdout);
  for (;;) {
    struct sockaddr_in peer;
    socklen_t len = sizeof peer;
    int c = accept(s, (struct sockaddr *)&peer, &len);
    if (c < 0) {
      continue;
    }
    struct timeval tv = {.tv_sec = 5};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char req[2048];
    ssize_t n = read(c, req, sizeof req - 1);
    req[n > 0 ? n : 0] = 0;
    char *eol = strpbrk(req, "\r\n");
    if (eol) {
      *eol = 0;
    }
    char body[512];
    int blen = snprintf(body, sizeof body, "hello from %s\n", host);
    char resp[1024];
    int rlen = snprintf(resp, sizeof resp,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                        "Connection: close\r\n\r\n%s",
                        blen, body);
    if (write(c, resp, (size_t)rlen) < 0) {
      perror("nodetest: write");
    }
    close(c);
    char ip[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
    printf("request from %s: %s\n", ip, req);
    fflush(stdout);
  }
}

static int get(const char *ip, const char *port, const char *path) {
  int fd = dial(ip, port);
  if (fd < 0) {
    return 1;
  }
  char req[1024];
  int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: %s:%s\r\n\r\n", path, ip, port);
  if (write(fd, req, (size_t)n) != n) {
    perror("nodetest: write");
    return 1;
  }
  char buf[4096];
  size_t total = 0;
  ssize_t r;
  while (total < sizeof buf - 1 && (r = read(fd, buf + total, sizeof buf - 1 - total)) > 0) {
    total += (size_t)r;
  }
  buf[total] = 0;
  close(fd);
  fputs(buf, stdout);
  return strncmp(buf, "HTTP/1.0 200", 12) == 0 || strncmp(buf, "HTTP/1.1 200", 12) == 0 ? 0 : 1;
}

static int cat(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "nodetest: %s: %s\n", path, strerror(errno));
    return 1;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
    fwrite(buf, 1, n, stdout);
  }
  fclose(f);
  return 0;
}

static int resolve(const char *name) {
  struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM};
  struct addrinfo *res;
  int rc = getaddrinfo(name, NULL, &hints, &res);
  if (rc != 0) {
    fprintf(stderr, "nodetest: resolve %s: %s\n", name, gai_strerror(rc));
    return 1;
  }
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &((struct sockaddr_in *)ai->ai_addr)->sin_addr, ip, sizeof ip);
    printf("%s\n", ip);
  }
  freeaddrinfo(res);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "serve") == 0) {
    return serve(argv[2]);
  }
  if (argc == 5 && strcmp(argv[1], "get") == 0) {
    return get(argv[2], argv[3], argv[4]);
  }
  if (argc == 4 && strcmp(argv[1], "tcp") == 0) {
    int fd = dial(argv[2], argv[3]);
    if (fd < 0) {
      return 1;
    }
    close(fd);
    printf("connected to %s:%s\n", argv[2], argv[3]);
    return 0;
  }
  if (argc == 3 && strcmp(argv[1], "cat") == 0) {
    return cat(argv[2]);
  }
  if (argc == 3 && strcmp(argv[1], "resolve") == 0) {
    return resolve(argv[2]);
  }
  fprintf(stderr, "usage: nodetest serve PORT | get IP PORT PATH | tcp IP PORT | cat FILE | resolve NAME\n");
  return 2;
}
