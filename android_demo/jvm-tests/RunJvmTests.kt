package org.dijiang.demo.jvmtests

import org.junit.runner.JUnitCore
import org.junit.runner.notification.Failure
import kotlin.system.exitProcess

/**
 * Runs the JUnit classes named on the command line and prints "N passed, N failed", so
 * run_jvm_tests.sh needs neither Gradle nor Maven: only kotlinc and Debian's junit4 jar.
 */
fun main(args: Array<String>) {
    if (args.isEmpty()) {
        System.err.println("usage: RunJvmTests <test class>...")
        exitProcess(2)
    }
    val classes = args.map { Class.forName(it) }.toTypedArray()
    val result = JUnitCore().run(*classes)
    for (f: Failure in result.failures) {
        println("FAILED ${f.testHeader}")
        println("  " + f.trace.lines().take(8).joinToString("\n  "))
    }
    val failed = result.failureCount
    val passed = result.runCount - failed
    println("$passed passed, $failed failed (${classes.size} test classes)")
    exitProcess(if (failed == 0 && passed > 0) 0 else 1)
}
