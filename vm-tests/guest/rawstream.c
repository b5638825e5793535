/* keel-rawstream: the raw byte stream over vsock that the VM benchmarks measure keel's exec
 * output and cp against (the same transport with no protocol, no process, no file). Built
 * static by the VM test kit and put into the guest image; never part of keel itself.
 *
 *   keel-rawstream send PORT BYTES   listen on vsock PORT, accept one peer, write BYTES zeros
 *   keel-rawstream recv PORT [FILE]  listen on vsock PORT, accept one peer, read it to EOF
 *                                    (into FILE, created and fsynced, if given), print the
 *                                    byte count
 *   keel-rawstream write BYTES       write BYTES zeros to stdout: the producer keel's exec
 *                                    output is measured with, the same writes as `send`
 *   keel-rawstream relay PORT [FILE] listen on vsock PORT, accept one peer, copy stdin (a
 *                                    pipe: an agent's least work for a process's output, no
 *                                    protocol) or FILE (cp out as a plain loop) to it by read/write
 *                                    of up to 256 KiB
 *   keel-rawstream splice PORT       the same from stdin by splice(2), the bytes never in
 *                                    user memory
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int write_zeros(int fd, unsigned long long left) {
    static char buf[256 << 10];
    while (left > 0) {
        size_t n = left < sizeof buf ? (size_t)left : sizeof buf;
        ssize_t w = write(fd, buf, n);
        if (w <= 0) {
            perror("keel-rawstream: write");
            return 1;
        }
        left -= (unsigned long long)w;
    }
    return 0;
}

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
        int rc = write_zeros(c, strtoull(argv[3], NULL, 10));
        close(c);
        return rc;
    }
    if ((argc == 3 || argc == 4) && strcmp(argv[1], "relay") == 0) {
        int in = 0;
        if (argc == 4 && (in = open(argv[3], O_RDONLY)) < 0) {
            perror("keel-rawstream: open");
            return 1;
        }
        int c = accept_one((unsigned)strtoul(argv[2], NULL, 10));
        ssize_t r;
        while ((r = read(in, buf, sizeof buf)) > 0) {
            for (ssize_t off = 0; off < r;) {
                ssize_t w = write(c, buf + off, (size_t)(r - off));
                if (w <= 0) {
                    perror("keel-rawstream: relay write");
                    return 1;
                }
                off += w;
            }
        }
        close(c);
        return r < 0;
    }
    if (argc == 3 && strcmp(argv[1], "splice") == 0) {
        int c = accept_one((unsigned)strtoul(argv[2], NULL, 10));
        ssize_t r;
        while ((r = splice(0, NULL, c, NULL, 64 << 10, SPLICE_F_MOVE | SPLICE_F_MORE)) > 0)
            ;
        if (r < 0)
            perror("keel-rawstream: splice");
        close(c);
        return r < 0;
    }
    if (argc == 3 && strcmp(argv[1], "write") == 0)
        return write_zeros(1, strtoull(argv[2], NULL, 10));
    if ((argc == 3 || argc == 4) && strcmp(argv[1], "recv") == 0) {
        int out = -1;
        if (argc == 4 && (out = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0644)) < 0) {
            perror("keel-rawstream: open");
            return 1;
        }
        int c = accept_one((unsigned)strtoul(argv[2], NULL, 10));
        unsigned long long total = 0;
        ssize_t r;
        while ((r = read(c, buf, sizeof buf)) > 0) {
            if (out >= 0 && write(out, buf, (size_t)r) != r) {
                perror("keel-rawstream: write to file");
                return 1;
            }
            total += (unsigned long long)r;
        }
        if (out >= 0 && (fsync(out) < 0 || close(out) < 0)) {
            perror("keel-rawstream: fsync");
            return 1;
        }
        printf("%llu\n", total);
        return r < 0;
    }
    fprintf(stderr, "usage: keel-rawstream send PORT BYTES | recv PORT [FILE] | write BYTES | "
                    "relay PORT [FILE] | splice PORT\n");
    return 2;
}
