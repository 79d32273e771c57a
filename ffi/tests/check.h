/*
 * The checks of the C test programs: CHECK(cond) counts a check and, when it fails, prints
 * where, the condition and ic_last_error(), and exits with status 1; EXPECT(call, code)
 * checks a call's result.
 */
#ifndef IC_TEST_CHECK_H
#define IC_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include "isolate_cluster.h"

static int checks = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        checks++;                                                                    \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,  \
                    __LINE__, #cond, ic_last_error());                               \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

#define EXPECT(call, code) CHECK((call) == (code))

#endif
