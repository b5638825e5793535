/* keel-rawstream: the raw byte stream over vsock that the VM benchmarks measure keel's exec
 * output and cp against (the same transport with no protocol, no process, no file). Built
 * static by the VM test kit and put into the guest image; never part of keel itself.
 *
 *   keel-rawstream send PORT BYTES   listen on vsock PORT, accept one peer, write BYTES zeros
 *   keel-rawstream recv PORT         listen on vsock PORT, accept one peer, read it to EOF,
 *                                    print the byte count
 */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int accept_one(unsigned port) {
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = VMADDR_CID_ANY;
    a.svm_port = port;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0) {
        perror("keel-rawstream: listen");
        exit(1);
    }
    int c = accept(l, NULL, NULL);
    if (c < 0) {
        perror("keel-rawstream: accept");
        exit(1);
    }
    close(l);
    return c;
}

int main(int argc, char **argv) {
    static char buf[256 << 10];
    if (argc == 4 && strcmp(argv[1], "send") == 0) {
        int c = accept_one((unsigned)strtoul(argv[2], NULL, 10));
        unsigned long long left = strtoull(argv[3], NULL, 10);
        while (left > 0) {
            size_t n = left < sizeof buf ? (size_t)left : sizeof buf;
            ssize_t w = write(c, buf, n);
            if (w <= 0) {
                perror("keel-rawstream: write");
                return 1;
            }
            left -= (unsigned long long)w;
        }
        close(c);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "recv") == 0) {
        int c = accept_one((unsigned)strtoul(argv[2], NULL, 10));
        unsigned long long total = 0;
        ssize_t r;
        while ((r = read(c, buf, sizeof buf)) > 0)
            total += (unsigned long long)r;
        printf("%llu\n", total);
        return r < 0;
    }
    fprintf(stderr, "usage: keel-rawstream send PORT BYTES | recv PORT\n");
    return 2;
}
